"""The portable steering-vector file: ``{v, alpha}`` plus what is needed to apply it again.

    from modules.models.steering_io import load_steered_model
    model, tokenizer, steering = load_steered_model("steering_runs/my_run/steering_vector.pt")
    # generate as usual: the steering is on; `with steering.disabled():` for the base model

The file is a plain ``torch.save`` dict of tensors, strings and numbers (loadable with
``weights_only=True``), written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modules.errors import UserError
from modules.files import atomic_path
from modules.models.loading import load_causal_lm
from modules.models.steering import Steering, SteeringVector

FORMAT = "rl_insides.steering_vector/1"


def save_steering_vector(path: str | Path, vector: SteeringVector, metadata: dict) -> Path:
    """Write ``{v, alpha, metadata}``; metadata needs base_model, hook_layer, hook_point, steer_positions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "v": vector.v.detach().float().cpu().clone(),
               "alpha": vector.alpha.detach().float().cpu().reshape(()).clone(), "metadata": metadata}
    with atomic_path(path) as partial, open(partial, "wb") as file:
        torch.save(payload, file)  # through a Python file: a full disk raises OSError, not a bare RuntimeError
    return path


def read_steering_vector(path: str | Path) -> dict:
    """The file's contents, checked."""
    if not Path(path).is_file():
        raise UserError(f"steering vector file '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"'{path}' is not a readable steering vector file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a steering vector file of format {FORMAT}")
    return payload


def load_steered_model(path: str | Path, model: str | None = None, dtype: str = "auto", device: str | None = None):
    """Load the base model named in the file (or ``model``) with the vector attached and switched on.

    Returns ``(model, tokenizer, steering)``; ``steering.disabled()`` gives the unsteered model.
    """
    payload = read_steering_vector(path)
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
