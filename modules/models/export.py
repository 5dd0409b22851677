"""Steering vectors for tools outside the project: llama.cpp control vectors and ``steering-vectors``.

    python cli.py export --vector RUN/steering_vector.pt --format gguf --out sycophancy.gguf
    llama-cli -m model.gguf --control-vector sycophancy.gguf
    python cli.py export --vector RUN/checkpoints/last.ckpt --format steering-vectors --out sv.pt

The source is a vector file (``.pt``, :mod:`modules.models.steering_io`) or a SteeringVectorRL
checkpoint (``.ckpt``: ``state_dict["steering_vector.v"|"steering_vector.alpha"]``, the site in
``hyper_parameters``). What is exported is the vector that is added, ``alpha * v`` (fp32).

**GGUF control vector** (llama.cpp ``--control-vector``; llama-cpp-python through
``llama_set_adapter_cvec``). The file holds ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (the base model's ``model_type``, as repeng writes it),
``controlvector.layer_count`` (the number of direction tensors, as repeng writes it: 1) and one
1-D F32 tensor ``direction.N``. Which ``N``, read in ggml-org/llama.cpp:

- ``common/common.cpp``, ``common_control_vector_load_one``: ``direction.N`` goes to offset
  ``n_embd * (N - 1)`` of a flat buffer; ``N == 0`` is rejected ("invalid (zero) direction tensor
  layer index"), so no file can hold a direction for layer 0.
- ``src/llama-adapter.cpp``, ``llama_adapter_cvec::apply``: block ``il`` (from 1) reads offset
  ``n_embd * (il - 1)``, and ``llama_adapter_cvec::apply_to(ctx, cur, il)`` adds it; the two ``- 1``
  cancel: ``direction.N`` is added at block ``il = N``.
- ``src/models/llama.cpp`` (graph of the llama architecture) and ``src/llama-graph.cpp``
  (``llm_graph_context::build_cvec`` calls ``cvec->apply_to``): in the loop over blocks ``il = 0 ..
  n_layer - 1``, ``cur = build_cvec(cur, il)`` comes right after the FFN residual add, on the
  tensor named ``l_out`` that feeds block ``il + 1``: the residual stream after block ``il``.

Block ``il`` is HF's ``model.layers[il]`` (both 0-based), so a vector trained at ``hook_point:
layer_output`` of layer ``L`` is exactly ``direction.L``: no shift. Layer 0 cannot be expressed
(``direction.0`` is refused by the loader, and shifting it to ``direction.1`` would steer after
layer 1, which is another intervention): export refuses it. llama.cpp's default layer range (1 ..
n_layer) includes every other ``L``. ``post_attn_norm``/``pre_attn_norm`` vectors are added
inside a layer, after a norm, not to the residual stream: refused. llama.cpp adds a control
vector at every position, so a vector trained with ``steer_positions`` other than ``all`` is
refused unless ``--force true`` (then it steers every position, prompt included).

**steering-vectors** (github steering-vectors/steering-vectors, 0.12: ``SteeringVector(
layer_activations: dict[int, Tensor], layer_type)``, ``steering_vector.py``/``layer_matching.py``).
Its hook adds ``layer_activations[i]`` to the output of the ``i``-th module matching the layer
type's name pattern (0-based, e.g. ``model.layers.{num}`` for ``decoder_block``), at every token
unless ``min_token_index``/``token_indices`` is given. Our sites are all modules it can match:
``layer_output`` -> ``decoder_block``, ``pre_attn_norm`` -> ``input_layernorm``,
``post_attn_norm`` -> ``post_attention_layernorm``, index ``L`` unchanged. The file is
``torch.save({"layer_activations": {L: alpha*v}, "layer_type": ...})``, so
``SteeringVector(**torch.load(path))`` makes the object; an ``--out`` ending in ``.safetensors``
writes tensor ``"L"`` with ``layer_type`` and the provenance in the header's metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.errors import UserError
from modules.files import atomic_path

FORMATS = ("gguf", "steering-vectors")
GGUF_ARCH = "controlvector"
SV_LAYER_TYPES = {"layer_output": "decoder_block", "pre_attn_norm": "input_layernorm",
                  "post_attn_norm": "post_attention_layernorm"}
"""Our hook point -> the ``layer_type`` of the steering-vectors package that patches the same module."""


@dataclass(frozen=True)
class ExportableVector:
    """What an export needs: the added vector ``alpha * v`` and where and how it was trained."""

    delta: torch.Tensor
    hook_layer: int
    hook_point: str
    steer_positions: str
    base_model: str | None
    step: int | None
    source: str


# -- reading ---------------------------------------------------------------------------------------
def read_exportable(path: str | Path) -> ExportableVector:
    """The vector in a vector file (``.pt``; a run folder means its ``steering_vector.pt``) or a
    SteeringVectorRL checkpoint (``.ckpt``)."""
    path = Path(path)
    if path.is_dir() and (path / "steering_vector.pt").is_file():  # a run folder: its final vector
        path = path / "steering_vector.pt"
    elif path.is_dir():
        raise UserError(f"'{path}' is a folder (a sharded DeepSpeed/FSDP checkpoint?): export the run's "
                        "vectors/updateNNNNNN.pt or steering_vector.pt instead")
    if not path.is_file():
        raise UserError(f"vector file '{path}' does not exist")
    return _from_checkpoint(path) if path.suffix == ".ckpt" else _from_vector_file(path)


def _from_vector_file(path: Path) -> ExportableVector:
    from modules.models.steering_io import read_steering_vector

    payload = read_steering_vector(path)
    meta = payload["metadata"]
    delta = (payload["alpha"].float() * payload["v"].float()).reshape(-1)
    return ExportableVector(delta, int(meta["hook_layer"]), str(meta["hook_point"]),
                            str(meta.get("steer_positions", "all")), meta.get("base_model"), meta.get("step"),
                            str(path))


def _from_checkpoint(path: Path) -> ExportableVector:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a truncated file, a foreign pickle
        raise UserError(f"'{path}' is not a readable checkpoint ({type(err).__name__})") from None
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    if "steering_vector.v" not in state:
        writer = checkpoint.get("on_policy", {}).get("method") if isinstance(checkpoint, dict) else None
        by = f" (written by {writer})" if writer else ""
        raise UserError(f"'{path}' holds no steering vector{by}: export works for SteeringVectorRL runs")
    hp = checkpoint.get("hyper_parameters", {})
    v = state["steering_vector.v"].float()
    if "steering_vector.alpha" in state:
        alpha = state["steering_vector.alpha"].float().reshape(())
    elif hp.get("init_from"):  # frozen alpha, copied from another file: not in the checkpoint
        raise UserError(f"'{path}' does not hold alpha (train_alpha: false, init_from): export the run's "
                        "vectors/updateNNNNNN.pt instead")
    else:
        alpha = torch.tensor(float(hp.get("alpha_init", 1.0)))
    if "hook_layer" not in hp or "hook_point" not in hp:
        raise UserError(f"'{path}' does not record hook_layer and hook_point: export the run's "
                        "vectors/updateNNNNNN.pt instead")
    step = checkpoint.get("on_policy", {}).get("rollout_batches_done")
    return ExportableVector((alpha * v).reshape(-1).clone(), int(hp["hook_layer"]), str(hp["hook_point"]),
                            str(hp.get("steer_positions", "all")), hp.get("model"), step, str(path))


# -- where the vector goes -------------------------------------------------------------------------
def gguf_direction_index(hook_point: str, hook_layer: int) -> int:
    """``N`` of the ``direction.N`` tensor that llama.cpp adds where our ``hook_point`` at
    ``hook_layer`` adds (the module docstring says why it is ``hook_layer``); refuses what has none."""
    if hook_point != "layer_output":
        raise UserError(f"hook_point '{hook_point}' adds the vector after a norm inside layer {hook_layer}, not to "
                        "the residual stream where llama.cpp adds a control vector: only vectors trained with "
                        "hook_point: layer_output export to gguf")
    if hook_layer < 1:
        raise UserError("hook_layer 0 cannot be a llama.cpp control vector: its loader rejects direction.0 and "
                        "steers from the output of layer 1 on; train at hook_layer >= 1")
    return hook_layer


def check_positions(vector: ExportableVector, target: str, force: bool) -> None:
    """Refuse (or, with ``force``, warn about) a vector whose positions the target cannot express."""
    if vector.steer_positions == "all":
        return
    what = (f"the vector was trained with steer_positions: {vector.steer_positions}, but {target} adds it at "
            "every position, prompt included")
    if not force:
        raise UserError(f"{what}: pass --force true to export it anyway, or train with steer_positions: all")
    print(f"warning: {what}; exported anyway (--force true)", file=sys.stderr)


def model_hint(base_model: str | None) -> str | None:
    """The base model's ``model_type`` when its config can be read on this machine (a local folder,
    a GGUF file, the embedded model's GGUF, a Hub id in the local cache), else ``None``."""
    if not base_model:
        return None
    if base_model.startswith("embedded:"):
        from modules.models import embedded

        name = base_model.split(":", 1)[1]
        try:
            source = embedded.gguf_path(name)
        except UserError:
            return None
        dist, _, filename = embedded.EMBEDDED[name]
        converted = embedded.cache_root() / f"{Path(filename).stem}-{importlib.metadata.version(dist)}"
        if (converted / "config.json").is_file():  # the folder embedded.cached_folder converts to (fast)
            return json.loads((converted / "config.json").read_text()).get("model_type")
        return _gguf_architecture(source)  # a few seconds: the reader parses the whole header
    path = Path(base_model).expanduser()
    if base_model.endswith(".gguf"):
        return _gguf_architecture(path) if path.is_file() else None
    config = path / "config.json"
    if not config.is_file():
        try:
            import huggingface_hub

            cached = huggingface_hub.try_to_load_from_cache(base_model, "config.json")
        except Exception:  # not a valid repo id
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _gguf_architecture(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).get_field("general.architecture")
    return None if field is None else bytes(field.parts[-1]).decode("utf-8")


# -- writing ---------------------------------------------------------------------------------------
def write_gguf(vector: ExportableVector, out: str | Path, hint: str) -> tuple[Path, str]:
    """Write the llama.cpp control vector (atomically); returns the path and the tensor name."""
    from gguf import GGUFWriter

    name = f"direction.{gguf_direction_index(vector.hook_point, vector.hook_layer)}"
    out = Path(out)
    with atomic_path(out) as partial:
        writer = GGUFWriter(partial, GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", 1)
        for key, value in _provenance(vector).items():
            if isinstance(value, int):
                writer.add_int32(f"rl_insides.{key}", value)
            else:
                writer.add_string(f"rl_insides.{key}", value)
        writer.add_tensor(name, vector.delta.float().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _fsync(partial)
    return out, name


def steering_vectors_payload(vector: ExportableVector) -> dict:
    """``{"layer_activations": {L: alpha*v}, "layer_type": ...}``: ``SteeringVector(**payload)``."""
    if vector.hook_point not in SV_LAYER_TYPES:
        raise UserError(f"hook_point '{vector.hook_point}' has no steering-vectors layer type: use one of "
                        f"{', '.join(SV_LAYER_TYPES)}")
    return {"layer_activations": {vector.hook_layer: vector.delta.float().clone()},
            "layer_type": SV_LAYER_TYPES[vector.hook_point]}


def write_steering_vectors(vector: ExportableVector, out: str | Path) -> Path:
    """Write the steering-vectors payload: a ``torch.save`` file, or safetensors for a ``.safetensors`` name."""
    payload = steering_vectors_payload(vector)
    out = Path(out)
    with atomic_path(out) as partial:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = {str(layer): t.contiguous() for layer, t in payload["layer_activations"].items()}
            header = {"layer_type": payload["layer_type"], **{k: str(v) for k, v in _provenance(vector).items()}}
            save_file(tensors, str(partial), metadata=header)
        else:
            with open(partial, "wb") as file:
                torch.save(payload, file)
        _fsync(partial)
    return out


def _provenance(vector: ExportableVector) -> dict[str, str | int]:
    """Where the vector came from (GGUF keys ``rl_insides.*``; the safetensors header holds them as text)."""
    facts = {"base_model": vector.base_model, "hook_layer": vector.hook_layer, "hook_point": vector.hook_point,
             "steer_positions": vector.steer_positions, "step": vector.step, "source": Path(vector.source).name}
    return {k: v if isinstance(v, int) else str(v) for k, v in facts.items() if v is not None}


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


# -- the command -----------------------------------------------------------------------------------
def export_command(argv: list[str]) -> None:
    """``python cli.py export``: a vector file or checkpoint as a llama.cpp control vector or a
    steering-vectors file."""
    from modules.options import parse_args, tool_parser

    parser = tool_parser("export", "Write a trained steering vector (alpha*v) for llama.cpp (gguf) or the "
                         "steering-vectors package.")
    parser.add_argument("--vector", type=str, required=True,
                        help="A vector file (RUN/steering_vector.pt, RUN/vectors/update*.pt) or a checkpoint (.ckpt).")
    parser.add_argument("--format", type=str, required=True, help=f"One of {', '.join(FORMATS)}.")
    parser.add_argument("--out", type=str, required=True,
                        help="The file to write (.gguf; for steering-vectors .pt, or .safetensors).")
    parser.add_argument("--model_hint", type=str | None, default=None,
                        help="gguf: controlvector.model_hint (default: the base model's model_type, e.g. llama).")
    parser.add_argument("--force", type=bool, default=False,
                        help="Export a vector trained with steer_positions other than all (it then steers every position).")
    args = parse_args(parser, argv)
    if args.format not in FORMATS:
        raise UserError(f"unknown format '{args.format}': use one of {', '.join(FORMATS)}")
    vector = read_exportable(args.vector)
    norm = float(vector.delta.norm())
    if args.format == "gguf":
        gguf_direction_index(vector.hook_point, vector.hook_layer)
        check_positions(vector, "llama.cpp", args.force)
        hint = args.model_hint or model_hint(vector.base_model)
        if not hint:
            raise UserError(f"cannot read the config of base model '{vector.base_model}' here for "
                            "controlvector.model_hint: pass --model_hint (e.g. llama)")
        out, name = write_gguf(vector, args.out, hint)
        print(f"wrote {out}: {name} ({vector.delta.numel()} floats, |alpha*v| = {norm:.4g}), model_hint {hint}")
        print(f"use: llama-cli -m BASE_MODEL.gguf --control-vector {out}")
    else:
        steering_vectors_payload(vector)
        check_positions(vector, "steering-vectors (without min_token_index)", args.force)
        out = write_steering_vectors(vector, args.out)
        layer_type = SV_LAYER_TYPES[vector.hook_point]
        print(f"wrote {out}: layer {vector.hook_layer}, layer_type {layer_type} "
              f"({vector.delta.numel()} floats, |alpha*v| = {norm:.4g})")
        print("use: SteeringVector(**torch.load(path)) from the steering_vectors package" if out.suffix != ".safetensors"
              else "use: safe_open(path, 'pt'): tensor 'LAYER' and metadata()['layer_type'] -> SteeringVector")
