"""SARM's released checkpoint format: read its layout, check it, write folders in it.

A SARM folder (``Schrieffer/Llama-SARM-4B`` on the Hub, or one written by :func:`write_sarm_folder`):

- ``config.json``: a Llama config (its ``num_hidden_layers`` may still be the base model's) plus the
  SAE settings, in either of two places (both are read):

  - ``sarm_param`` (the released remote code, ``modeling_sarm_llama.py``): ``sae_latent_size``,
    ``sae_k``, ``sarm_use_activation`` (True: TopK latents feed the score head), optionally
    ``sae_source_layer``, ``sae_use_sequence_level`` and, in folders we write, ``sarm_aggregate_latents``,
    ``pooling`` and ``eot_token_id``;
  - the top level, under the names of the authors' training code, where their ``LlamaSARM``
    classes take them as arguments (``src/sarm_llama.py``; ``src/bradley_terry.py`` passes them):
    ``sae_hidden_state_source_layer``, ``sae_latent_size``, ``sae_k``, ``sarm_use_topk`` (older:
    ``sae4rm_use_topk``), ``sarm_aggregate_latents``, ``sae_use_sequence_level``, ``sarm_train_mode``.
    (``from_pretrained`` keeps such arguments out of ``config.json``; folders carry them there when
    a script or a person copied them in.)

  :data:`CONFIG_SETTINGS` lists every name read. A setting given twice (in both places, or under two
  names) must agree, else one line names both and their values.
- ``*.safetensors`` (one file, or shards listed in ``model.safetensors.index.json``) holding
  ``model.embed_tokens.weight``, ``model.layers.{0..L-1}.*``, ``model.norm.weight`` (present, never
  applied), ``sae.pre_bias``, ``sae.latent_bias``, ``sae.encoder.weight``, ``sae.decoder.weight``
  and ``score.weight`` [1, latent].
- the tokenizer files (optional: scoring raw token ids needs none; text needs one, from the folder
  or the caller's ``tokenizer`` option — the authors' checkpoint folders hold none).

:func:`inspect_sarm_folder` reads only the tensor headers. Sizes come from the tensors: hidden
size and vocabulary from the embedding, L from the layer keys, latent size from ``score.weight``,
the MLP width and head counts from the first layer; a source layer or latent size in the config
that disagrees with them is an error. Every missing or misshapen tensor is reported as one
:class:`~modules.errors.UserError` line before any weight is read.

Dense or TopK comes from the caller's ``score_mode`` (``topk``/``dense``) where given, else from the
folder's own flag; with neither, loading stops and asks for ``score_mode``. TopK's k likewise comes
from the caller's ``k``, else ``sae_k``. An explicit option wins over the folder.

Departures from the authors' code (github.com/schrieffer-z/sarm, ``src/modeling_sarm_llama.py``):
1. Sizes are read from the tensors; their code takes them from ``sarm_param`` or from arguments
   (and L defaults to half the config's layers there).
2. Both places of the settings are read; their remote code reads only ``sarm_param``, their
   training classes only their arguments (where ``sarm_use_topk`` defaults to False, dense). No
   flag is taken to mean either mode here: the caller must say.
3. ``eot_token_id`` and ``pooling`` are our additions (their code hard-codes Llama-3's
   ``<|eot_id|>`` = 128009 and last-token pooling); absent, they default to those.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from modules.errors import UserError

LLAMA3_EOT_ID = 128009
SAE_KEYS = ("sae.pre_bias", "sae.latent_bias", "sae.encoder.weight", "sae.decoder.weight")
OPTIONAL_BACKBONE_KEYS = ("model.norm.weight",)  # in the checkpoint, never applied
SCORE_MODES = ("auto", "topk", "dense")
POOLINGS = ("auto", "last", "aggregate")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        raise ValueError("is not a whole number")
    return int(value)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError("is not true or false")


def _pooling(value: Any) -> str:
    if value not in ("last", "aggregate"):
        raise ValueError("is not last or aggregate")
    return value


CONFIG_SETTINGS: dict[str, tuple[tuple[str, Callable[[Any], Any]], ...]] = {
    "k": (("sae_k", _whole),),
    "latent_size": (("sae_latent_size", _whole),),
    "source_layer": (("sae_source_layer", _whole), ("sae_hidden_state_source_layer", _whole)),
    "use_topk": (("sarm_use_activation", _flag), ("sarm_use_topk", _flag), ("sae4rm_use_topk", _flag)),
    "pooling": (("pooling", _pooling), ("sarm_aggregate_latents", lambda v: "aggregate" if _flag(v) else "last")),
    "end_token_id": (("eot_token_id", _whole),),
}
"""Every SAE setting read from config.json: setting -> its (name, parser) pairs, each looked up both in
``sarm_param`` and at the top level."""
_SETTING_NAMES = {name for names in CONFIG_SETTINGS.values() for name, _ in names} | {
    "sae_use_sequence_level", "sarm_train_mode"}


@dataclass(frozen=True)
class ConfigValue:
    """One SAE setting as config.json gives it."""

    value: Any
    where: str
    """Its place: ``sarm_param.sae_k`` or ``top-level sae_k``."""


def config_setting(raw: dict, setting: str, where: str, hint: str = "") -> ConfigValue | None:
    """``setting`` (a key of :data:`CONFIG_SETTINGS`) from a parsed config.json, or None where it is not given.

    Given more than once (in ``sarm_param`` and at the top level, or under two names), the values must
    agree; otherwise one UserError line names both places, their values and ``hint``.
    """
    found: list[tuple[ConfigValue, Any]] = []
    for table, prefix in ((raw.get("sarm_param") or {}, "sarm_param."), (raw, "top-level ")):
        for name, parse in CONFIG_SETTINGS[setting]:
            if table.get(name) is None:
                continue
            place = prefix + name
            try:
                found.append((ConfigValue(parse(table[name]), place), table[name]))
            except ValueError as err:
                raise UserError(f"{where}: config.json's {place} = {json.dumps(table[name])} {err}") from None
    if not found:
        return None
    (first, first_raw), *others = found
    for other, other_raw in others:
        if other.value != first.value:
            raise UserError(f"{where}: config.json gives {first.where} = {json.dumps(first_raw)} but "
                            f"{other.where} = {json.dumps(other_raw)}{hint}")
    return first


@dataclass
class TensorEntry:
    file: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class SARMSpec:
    """What a SARM folder holds, read from its config and tensor headers (no weights loaded)."""

    folder: Path
    llama_config: dict
    """The Llama config of the backbone, sizes corrected from the tensors, ``num_hidden_layers`` = L."""
    source_layer: int
    """L: decoder layers before the SAE (the SAE reads the residual stream after layer L-1)."""
    hidden_size: int
    latent_size: int
    k: int | None
    """TopK's k: the caller's ``k``, else the config's ``sae_k`` (None: neither; only dense can score)."""
    use_topk: bool
    """True: the score head reads the TopK latents; False: the dense pre-activations."""
    pooling: str
    """``last`` (the end-of-turn token) or ``aggregate`` (sum over the response's tokens)."""
    end_token_id: int
    sarm_param: dict
    mode_from: str = ""
    """Where dense or TopK came from: the caller's ``score_mode`` or the config's flag (its place)."""
    tensors: dict[str, TensorEntry] = field(repr=False, default_factory=dict)


def tensor_index(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor's file, shape and dtype, from the safetensors headers."""
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise UserError(f"{index_file} is not a safetensors index ({err})") from None
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"SARM folder '{folder}' holds no .safetensors weights")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise UserError(f"SARM folder '{folder}' lacks {name}, listed in its safetensors index")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    entries[key] = TensorEntry(name, tuple(piece.get_shape()), str(piece.get_dtype()))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise UserError(f"could not read {path} ({str(err).splitlines()[0]})") from None
    return entries


def _expected_backbone_shapes(llama_config: dict) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaConfig, LlamaModel

    with torch.device("meta"):
        model = LlamaModel(LlamaConfig.from_dict(llama_config))
    return {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}


def _shape_problem(key: str, entries: dict[str, TensorEntry], expected: tuple[int, ...]) -> str | None:
    if key not in entries:
        return f"missing tensor '{key}'"
    if entries[key].shape != expected:
        return f"tensor '{key}' has shape {list(entries[key].shape)}, expected {list(expected)}"
    return None


def inspect_sarm_folder(folder: str | Path, k: int | None = None, score_mode: str = "auto",
                        pooling: str = "auto") -> SARMSpec:
    """Read and check a SARM folder's layout; raise one UserError line on the first problem.

    ``k``, ``score_mode`` (``topk``/``dense``) and ``pooling`` (``last``/``aggregate``), where given,
    win over the folder's config; ``auto`` takes the config's setting (a missing TopK flag is an error).
    """
    if score_mode not in SCORE_MODES:
        raise UserError(f"score_mode must be one of {', '.join(SCORE_MODES)}, got '{score_mode}'")
    if pooling not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"SARM folder '{folder}' holds no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as err:
        raise UserError(f"{config_file} is not valid JSON ({err})") from None
    where = f"SARM folder '{folder}'"
    if not isinstance(raw, dict) or not isinstance(raw.get("sarm_param") or {}, dict):
        raise UserError(f"{where}: config.json (or its sarm_param) is not a JSON object")
    sarm_param = dict(raw.get("sarm_param") or {})
    entries = tensor_index(folder)

    for key in ("model.embed_tokens.weight", "score.weight", *SAE_KEYS):
        if key not in entries:
            raise UserError(f"{where}: missing tensor '{key}'")
    vocab, hidden = entries["model.embed_tokens.weight"].shape
    score_shape = entries["score.weight"].shape
    if len(score_shape) != 2 or score_shape[0] != 1:
        raise UserError(f"{where}: tensor 'score.weight' has shape {list(score_shape)}, expected [1, latent]")
    latent = score_shape[1]
    for key, expected in (("sae.pre_bias", (hidden,)), ("sae.latent_bias", (latent,)),
                          ("sae.encoder.weight", (latent, hidden)), ("sae.decoder.weight", (hidden, latent))):
        problem = _shape_problem(key, entries, expected)
        if problem:
            raise UserError(f"{where}: {problem}")
    configured = config_setting(raw, "latent_size", where)
    if configured is not None and configured.value != latent:
        raise UserError(f"{where}: config.json's {configured.where} = {configured.value} but 'score.weight' "
                        f"holds {latent} latents")

    layers = sorted({int(m.group(1)) for key in entries if (m := _LAYER_KEY.match(key))})
    if not layers:
        raise UserError(f"{where}: no decoder layers (model.layers.*) in the weights")
    if layers != list(range(len(layers))):
        gap = next(i for i in range(len(layers) + 1) if i not in layers)
        raise UserError(f"{where}: decoder layer {gap} is missing (found layers {layers[0]}..{layers[-1]})")
    source_layer = len(layers)
    configured = config_setting(raw, "source_layer", where)
    if configured is not None and configured.value != source_layer:
        raise UserError(f"{where}: config.json's {configured.where} says source layer {configured.value} but the "
                        f"weights hold {source_layer} decoder layers")

    llama_config = {k: v for k, v in raw.items()
                    if k not in ("sarm_param", "auto_map", "architectures") and k not in _SETTING_NAMES}
    heads = int(llama_config.get("num_attention_heads") or 0)
    head_dim = int(llama_config.get("head_dim") or (hidden // heads if heads else 0))
    if not head_dim:
        raise UserError(f"{where}: config.json gives neither head_dim nor num_attention_heads")
    for key in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight"):
        if f"model.layers.0.{key}" not in entries:
            raise UserError(f"{where}: missing tensor 'model.layers.0.{key}'")
    llama_config.update(
        hidden_size=hidden, vocab_size=vocab, num_hidden_layers=source_layer, head_dim=head_dim,
        intermediate_size=entries["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_attention_heads=entries["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=entries["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
    )
    llama_config.pop("model_type", None)
    expected = _expected_backbone_shapes(llama_config)
    for key, shape in expected.items():
        if key in OPTIONAL_BACKBONE_KEYS and key not in entries:
            continue
        problem = _shape_problem(key, entries, shape)
        if problem:
            raise UserError(f"{where}: {problem}")

    if score_mode != "auto":
        use_topk, mode_from = score_mode == "topk", "the score_mode option"
    else:
        flag = config_setting(raw, "use_topk", where, " (pass score_mode topk or dense to choose)")
        if flag is None:
            raise UserError(f"{where}: config.json says neither TopK nor dense (no sarm_use_activation or "
                            "sarm_use_topk, in sarm_param or at the top level): pass score_mode topk or dense")
        use_topk, mode_from = flag.value, f"config.json's {flag.where}"
    if k is None:
        configured = config_setting(raw, "k", where, " (pass k to choose)")
        k = None if configured is None else configured.value
    if k is not None and not 0 < int(k) <= latent:
        raise UserError(f"{where}: sae_k = {k} must be in 1..{latent}")
    if use_topk and k is None:
        raise UserError(f"{where} gives no sae_k in config.json (in sarm_param or at the top level): pass k "
                        "(or score_mode dense)")
    if pooling == "auto":
        configured = config_setting(raw, "pooling", where, " (pass pooling last or aggregate to choose)")
        pooling = "last" if configured is None else configured.value
    end_token = config_setting(raw, "end_token_id", where)
    return SARMSpec(folder, llama_config, source_layer, hidden, latent, None if k is None else int(k), use_topk,
                    pooling, LLAMA3_EOT_ID if end_token is None else end_token.value, sarm_param, mode_from, entries)


def load_tensors(spec: SARMSpec, keys: list[str], dtype: torch.dtype, device: torch.device | str) -> dict:
    """The named tensors, converted to ``dtype`` and moved to ``device`` one at a time."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(spec.tensors[key].file, []).append(key)
    out = {}
    for name, file_keys in by_file.items():
        with safe_open(str(spec.folder / name), framework="pt") as f:
            for key in file_keys:
                out[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    return out


def write_sarm_folder(folder: str | Path, llama_config: dict, sarm_param: dict, tensors: dict[str, torch.Tensor],
                      tokenizer=None) -> Path:
    """Write a SARM folder in the released layout (one ``model.safetensors``, ``config.json``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in llama_config.items() if k not in ("quantization_config", "_name_or_path")}
    config.pop("num_labels", None)
    config.update(architectures=["LlamaSARM"], model_type="llama", id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0}, sarm_param=sarm_param)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
