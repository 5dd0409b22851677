"""The injection scheme our oracle uses, layer percentages, and the adapters' ``ao_config.json``.

Our scheme (the public Activation Oracles scheme):

- extraction at the output of decoder layer ``int(num_layers * percent / 100)`` (0-based), for
  percent 25, 50 or 75 by default (Qwen3-8B, 36 layers: 9, 18, 27; SmolLM2-135M, 30 layers: 7, 15, 22);
- injection at the output of decoder layer 1, at the ``" ?"`` placeholders, norm-matched with
  coefficient 1: ``h' = h + 1.0 * ||h|| * v / ||v||``;
- prefix ``"Layer: {layer}\\n" + " ?" * n + " \\n"``; one layer per prompt.

Verified against the public code:

- ``nl_probes/utils/common.py`` (adamkarvonen/activation_oracles, 55f153f): ``layer_percent_to_layer``
  returns ``int(max_layers * (layer_percent / 100))`` (truncation, not rounding: SmolLM2 at 25 % is
  layer 7, where ``round`` would give 8).
- ``nl_probes/utils/activation_utils.py``: activations are the output of ``model.layers[layer]``
  (``get_hf_submodule``), collected with the LoRA disabled (``dataset_utils.materialize_missing_
  steering_vectors`` runs the forward under ``model.disable_adapter()``).
- ``nl_probes/configs/sft_config.py``: ``hook_onto_layer = 1``, ``steering_coefficient = 1.0``; in the
  dev repository (adamkarvonen/activation_oracles_dev, b58a041) the same file writes these with
  ``special_token``, ``prefix_template``, ``layer_combinations`` (percents) and
  ``act_layer_combinations`` (layer indices) to ``ao_config.json`` beside the adapter.

:func:`check_ao_config` refuses (one line) an adapter whose ``ao_config.json`` differs from this
scheme: another injection layer, placeholder, prefix, coefficient, several layers per prompt, or
layers that do not include the ones we would extract from.

Departure: 1. percentages are checked up front (0 < percent < 100 and a layer the model has) and
refused with a UserError; the public code would index out of range or silently use layer 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from modules.errors import UserError
from modules.oracle.format import SPECIAL_TOKEN

AO_CONFIG = "ao_config.json"
INJECTION_LAYER = 1
STEERING_COEFFICIENT = 1.0
PUBLIC_PREFIX_TEMPLATE = "Layer: {layer}\\n{special_token} * {num_positions} \\n"
"""The public code's description of the prefix, as it appears in ``ao_config.json``."""
DEFAULT_LAYER_PERCENTS = (25, 50, 75)


def layer_for_percent(num_layers: int, percent: float) -> int:
    """The extraction layer (0-based) at ``percent`` of depth: ``int(num_layers * percent / 100)``."""
    if not 0 < float(percent) < 100:
        raise UserError(f"layer percent {percent} is outside (0, 100): use e.g. 25, 50 or 75")
    layer = int(num_layers * (float(percent) / 100))
    if not 0 <= layer < num_layers:
        raise UserError(f"layer percent {percent} gives layer {layer}, which a {num_layers}-layer model lacks")
    return layer


def num_decoder_layers(model) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise UserError(f"cannot tell how many layers {type(model).__name__} has (no config.num_hidden_layers)")
    return int(n)


def layers_for_percents(model, percents: Sequence[float]) -> dict[float, int]:
    """``{percent: layer}`` for a model; refuses percentages the model cannot give."""
    n = num_decoder_layers(model)
    if n <= INJECTION_LAYER:
        raise UserError(f"the oracle injects at layer {INJECTION_LAYER}: a {n}-layer model is too shallow")
    return {p: layer_for_percent(n, p) for p in percents}


# -- ao_config.json ------------------------------------------------------------------------------
def read_ao_config(adapter: str | os.PathLike) -> dict[str, Any] | None:
    """An adapter's ``ao_config.json`` (a local folder, or a Hub id from the HF cache/Hub); None if absent."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        file = path / AO_CONFIG
        if not file.is_file():
            return None
    elif str(adapter).count("/") == 1 and not path.exists():
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(str(adapter), AO_CONFIG))
        except Exception:  # not on the Hub, offline, no such file: nothing to check
            return None
    else:
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{file}: unreadable {AO_CONFIG} ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: {AO_CONFIG} must hold a JSON object")
    return data


def _same_prefix(template: str) -> bool:
    def norm(s: str) -> str:
        return s.replace("\\n", "\n")

    return norm(template) == norm(PUBLIC_PREFIX_TEMPLATE)


def check_ao_config(config: dict[str, Any] | None, layers: Sequence[int] = (), source: str = "adapter") -> None:
    """Refuse (UserError) a config whose scheme differs from ours; ``layers`` are the extraction layers
    we would use. A missing config (None) passes: older adapters carry none."""
    if config is None:
        return
    where = f"{source}'s {AO_CONFIG}"
    hook = config.get("hook_onto_layer", INJECTION_LAYER)
    if hook != INJECTION_LAYER:
        raise UserError(f"{where} injects at layer {hook}; this oracle injects at layer {INJECTION_LAYER}")
    token = config.get("special_token", SPECIAL_TOKEN)
    if token != SPECIAL_TOKEN:
        raise UserError(f"{where} uses the placeholder {token!r}; this oracle uses {SPECIAL_TOKEN!r}")
    template = config.get("prefix_template", PUBLIC_PREFIX_TEMPLATE)
    if not _same_prefix(str(template)):
        raise UserError(f"{where} uses the prefix {template!r}; this oracle uses {PUBLIC_PREFIX_TEMPLATE!r}")
    coef = config.get("steering_coefficient", STEERING_COEFFICIENT)
    if float(coef) != STEERING_COEFFICIENT:
        raise UserError(f"{where} injects with coefficient {coef}; this oracle uses {STEERING_COEFFICIENT}")
    injection = config.get("injection", "norm_matched_add")
    if injection != "norm_matched_add":
        raise UserError(f"{where} uses the injection '{injection}'; this oracle adds norm-matched vectors")
    combos = config.get("act_layer_combinations") or []
    if any(len(c) != 1 for c in combos):
        raise UserError(f"{where} reads several layers per prompt {combos}; this oracle reads one layer per prompt")
    trained = sorted({c[0] for c in combos})
    missing = [layer for layer in layers if trained and layer not in trained]
    if missing:
        raise UserError(f"{where} was trained on layers {trained}, not {missing}: choose layer percents that give "
                        "those layers")


def ao_config_payload(model_name: str, percents: Sequence[float], layers: Sequence[int], **extra: Any) -> dict:
    """Our scheme as an ``ao_config.json`` payload (the public keys plus ours in ``extra``)."""
    return {
        "schema_version": 1,
        "model_name": model_name,
        "hook_onto_layer": INJECTION_LAYER,
        "special_token": SPECIAL_TOKEN,
        "prefix_template": PUBLIC_PREFIX_TEMPLATE,
        "steering_coefficient": STEERING_COEFFICIENT,
        "injection": "norm_matched_add",
        "layer_combinations": [[p] for p in percents],
        "act_layer_combinations": [[layer] for layer in layers],
        **extra,
    }


@dataclass(frozen=True)
class AdapterScheme:
    """What an adapter folder says about itself (for callers that need the layers it was trained on)."""

    layers: tuple[int, ...]
    format_system_prompt: str | None


def adapter_scheme(adapter: str | os.PathLike, layers: Sequence[int] = ()) -> AdapterScheme:
    """Read and check an adapter's ``ao_config.json``; refuses another scheme (UserError)."""
    config = read_ao_config(adapter)
    check_ao_config(config, layers, source=str(adapter))
    config = config or {}
    combos = config.get("act_layer_combinations") or []
    return AdapterScheme(tuple(sorted({c[0] for c in combos})), config.get("format_system_prompt"))
