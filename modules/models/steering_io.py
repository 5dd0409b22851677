"""The portable steering-vector file: ``{v, alpha}`` plus what is needed to apply it again.

    from modules.models.steering_io import load_steered_model
    model, tokenizer, steering = load_steered_model("steering_runs/my_run/steering_vector.pt")
    model, tokenizer, steering = load_steered_model("you/smollm2-sycophancy-vector")   # a Hub repo
    # generate as usual: the steering is on; `with steering.disabled():` for the base model

The file is a plain ``torch.save`` dict of tensors, strings and numbers (loadable with
``weights_only=True``), written atomically. A ``.safetensors`` copy (:func:`save_safetensors_copy`:
tensors ``v`` and ``alpha``, the metadata as JSON under the header key ``metadata``) reads the same.

Where a vector is named (:func:`resolve_vector_file`), it may be a file, a folder holding
``steering_vector.pt`` (a run folder, a downloaded repo), or a Hub reference ``owner/name``,
``owner/name@revision`` or ``owner/name[@revision]:file`` (default file ``steering_vector.pt``),
fetched through ``huggingface_hub.hf_hub_download``: the local HF cache first, ``HF_HUB_OFFLINE``
honoured (:mod:`modules.models.hub`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modules.errors import UserError
from modules.files import atomic_path
from modules.models.hub import hub_file, parse_hub_spec
from modules.models.loading import load_causal_lm
from modules.models.steering import Steering, SteeringVector

FORMAT = "rl_insides.steering_vector/1"
VECTOR_FILE = "steering_vector.pt"
SAFETENSORS_FILE = "steering_vector.safetensors"


def save_steering_vector(path: str | Path, vector: SteeringVector, metadata: dict) -> Path:
    """Write ``{v, alpha, metadata}``; metadata needs base_model, hook_layer, hook_point, steer_positions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "v": vector.v.detach().float().cpu().clone(),
               "alpha": vector.alpha.detach().float().cpu().reshape(()).clone(), "metadata": metadata}
    with atomic_path(path) as partial, open(partial, "wb") as file:
        torch.save(payload, file)  # through a Python file: a full disk raises OSError, not a bare RuntimeError
    return path


def save_safetensors_copy(payload: dict, path: str | Path) -> Path:
    """The vector of ``payload`` (as :func:`read_steering_vector` returns it) as a safetensors file."""
    from safetensors.torch import save_file

    tensors = {"v": payload["v"].float().contiguous(), "alpha": payload["alpha"].float().reshape(())}
    header = {"format": FORMAT, "metadata": json.dumps(payload["metadata"])}
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata=header)
    return Path(path)


def resolve_vector_file(spec: str | Path, revision: str | None = None) -> Path:
    """The local vector file that ``spec`` names: a file, a folder holding ``steering_vector.pt``
    (or ``.safetensors``), or a Hub reference (downloaded to, or found in, the HF cache)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in (VECTOR_FILE, SAFETENSORS_FILE):
            if (path / name).is_file():
                return path / name
        raise UserError(f"folder '{spec}' holds no {VECTOR_FILE}: point at a vector file or a run folder")
    hub = parse_hub_spec(str(spec))
    if hub is None:
        raise UserError(f"steering vector file '{spec}' does not exist")
    return hub_file(hub, VECTOR_FILE, revision, what="steering vector")


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        header = file.metadata() or {}
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    if header.get("format") != FORMAT or set(tensors) != {"v", "alpha"}:
        raise ValueError("not a steering vector")
    return {"format": FORMAT, "v": tensors["v"], "alpha": tensors["alpha"].reshape(()),
            "metadata": json.loads(header.get("metadata") or "{}")}


def read_steering_vector(path: str | Path, revision: str | None = None) -> dict:
    """The contents of the vector file that ``path`` names (see :func:`resolve_vector_file`), checked."""
    path = resolve_vector_file(path, revision)
    try:
        if path.suffix == ".safetensors":
            payload = _read_safetensors(path)
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"'{path}' is not a readable steering vector file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a steering vector file of format {FORMAT}")
    return payload


def load_steered_model(path: str | Path, model: str | None = None, dtype: str = "auto", device: str | None = None,
                       revision: str | None = None):
    """Load the base model named in the file (or ``model``) with the vector attached and switched on.

    ``path`` is a vector file, a folder holding one, or a Hub reference (``owner/name``,
    ``owner/name@revision``, ``owner/name:file``; or pass ``revision``).
    Returns ``(model, tokenizer, steering)``; ``steering.disabled()`` gives the unsteered model.
    """
    payload = read_steering_vector(path, revision)
    meta = payload["metadata"]
    lm, tokenizer = load_causal_lm(model or meta["base_model"], dtype, device)
    if lm.config.hidden_size != payload["v"].numel():
        raise UserError(f"the vector has {payload['v'].numel()} dims but the model's hidden size is {lm.config.hidden_size}")
    vector = SteeringVector(payload["v"].numel()).load_(payload["v"], payload["alpha"])
    vector.requires_grad_(False)
    vector.to(lm.device)
    steering = Steering(lm, vector, meta["hook_layer"], meta["hook_point"], meta.get("steer_positions", "all"),
                        meta.get("steer_last_k", 1))
    return lm, tokenizer, steering
