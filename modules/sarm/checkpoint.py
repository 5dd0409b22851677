"""SARM's released checkpoint format: read its layout, check it, write folders in it.

A SARM folder (``Schrieffer/Llama-SARM-4B`` on the Hub, or one written by :func:`write_sarm_folder`):

- ``config.json``: a Llama config (its ``num_hidden_layers`` may still be the base model's) plus
  ``sarm_param``: ``sae_latent_size``, ``sae_k``, ``sarm_use_activation`` (TopK latents feed the
  score head; older code calls it ``sarm_use_topk``), optionally ``sae_source_layer``,
  ``sarm_aggregate_latents`` and, in folders we write, ``eot_token_id`` and ``pooling``.
- ``*.safetensors`` (one file, or shards listed in ``model.safetensors.index.json``) holding
  ``model.embed_tokens.weight``, ``model.layers.{0..L-1}.*``, ``model.norm.weight`` (present, never
  applied), ``sae.pre_bias``, ``sae.latent_bias``, ``sae.encoder.weight``, ``sae.decoder.weight``
  and ``score.weight`` [1, latent].
- the tokenizer files (optional for us: scoring raw token ids needs none).

:func:`inspect_sarm_folder` reads only the tensor headers. Sizes come from the tensors: hidden
size and vocabulary from the embedding, L from the layer keys, latent size from ``score.weight``,
the MLP width and head counts from the first layer. Every missing or misshapen tensor is reported
as one :class:`~modules.errors.UserError` line before any weight is read.

Departures from the authors' code (github.com/schrieffer-z/sarm, ``src/modeling_sarm_llama.py``):
1. Sizes are read from the tensors; their code takes them from ``sarm_param`` (and L defaults to
   half the config's layers there).
2. A missing ``sarm_use_activation``/``sarm_use_topk`` flag means TopK (the released model's
   training recipe sets it); a missing ``sae_k`` must then be given by the caller.
3. ``eot_token_id`` and ``pooling`` in ``sarm_param`` are our additions (their code hard-codes
   Llama-3's ``<|eot_id|>`` = 128009 and last-token pooling); absent, they default to those.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modules.errors import UserError

LLAMA3_EOT_ID = 128009
SAE_KEYS = ("sae.pre_bias", "sae.latent_bias", "sae.encoder.weight", "sae.decoder.weight")
OPTIONAL_BACKBONE_KEYS = ("model.norm.weight",)  # in the checkpoint, never applied
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


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
    use_topk: bool
    """True: the score head reads the TopK latents; False: the dense pre-activations."""
    pooling: str
    """``last`` (the end-of-turn token) or ``aggregate`` (sum over the response's tokens)."""
    end_token_id: int
    sarm_param: dict
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


def inspect_sarm_folder(folder: str | Path, k: int | None = None) -> SARMSpec:
    """Read and check a SARM folder's layout; raise one UserError line on the first problem."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"SARM folder '{folder}' holds no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as err:
        raise UserError(f"{config_file} is not valid JSON ({err})") from None
    sarm_param = dict(raw.get("sarm_param") or {})
    entries = tensor_index(folder)
    where = f"SARM folder '{folder}'"

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

    layers = sorted({int(m.group(1)) for key in entries if (m := _LAYER_KEY.match(key))})
    if not layers:
        raise UserError(f"{where}: no decoder layers (model.layers.*) in the weights")
    if layers != list(range(len(layers))):
        gap = next(i for i in range(len(layers) + 1) if i not in layers)
        raise UserError(f"{where}: decoder layer {gap} is missing (found layers {layers[0]}..{layers[-1]})")
    source_layer = len(layers)
    configured = sarm_param.get("sae_source_layer", sarm_param.get("sae_hidden_state_source_layer"))
    if configured is not None and int(configured) != source_layer:
        raise UserError(f"{where}: sarm_param says source layer {configured} but the weights hold "
                        f"{source_layer} decoder layers")

    llama_config = {k: v for k, v in raw.items() if k not in ("sarm_param", "auto_map", "architectures")}
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

    flag = sarm_param.get("sarm_use_activation", sarm_param.get("sarm_use_topk"))
    use_topk = True if flag is None else bool(flag)
    k = k if k is not None else sarm_param.get("sae_k")
    if k is not None and not 0 < int(k) <= latent:
        raise UserError(f"{where}: sae_k = {k} must be in 1..{latent}")
    pooling = sarm_param.get("pooling") or ("aggregate" if sarm_param.get("sarm_aggregate_latents") else "last")
    end_token = sarm_param.get("eot_token_id", raw.get("eot_token_id", LLAMA3_EOT_ID))
    return SARMSpec(folder, llama_config, source_layer, hidden, latent, None if k is None else int(k), use_topk,
                    pooling, int(end_token), sarm_param, entries)


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


def resolve_sarm_source(source: str) -> Path:
    """A local SARM folder for ``source``: a folder, ``embedded:<name>`` (built once, cached), or a Hub id."""
    if source.startswith("embedded:"):
        from modules.sarm.embedded import cached_sarm_folder

        return cached_sarm_folder(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"SARM '{source}' is a file: point at a SARM folder (config.json + safetensors)")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"SARM folder '{source}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                          "special_tokens_map.json"])
    except Exception as err:  # offline, gated, unknown id: all one message
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"could not fetch SARM '{source}' from the Hub{offline}: {first}. "
                        "Pass a local SARM folder, 'embedded:sarm-smollm2', or a reachable Hub id") from None
    return Path(local)
