"""A trainable steering vector added at one site of a frozen decoder, as a switchable intervention.

``SteeringVector`` holds the trainable state, ``v`` (d_model) and the scalar ``alpha``, in fp32.
``Steering`` attaches it to a model with a forward hook and is the switch:

    steering = Steering(model, SteeringVector(d), layer=16, hook_point="post_attn_norm")
    with steering.disabled():      # the reference model: same weights, no steering
        ...

Hook points (module names as in Llama, Mistral and Qwen decoder layers):

- ``post_attn_norm``: add ``alpha * v`` to the output of the layer's post-attention RMSNorm
  (the input of the MLP);
- ``pre_attn_norm``: add it to the output of the layer's input RMSNorm (the input of attention);
- ``layer_output``: add it to the output of the decoder layer, the residual stream after the layer
  (the site of a llama.cpp control vector, so such a vector exports exactly).

Positions: ``all`` steers every token; ``response`` steers the positions that predict response
tokens (the last prompt token and every generated token), leaving the prompt's own
representations alone; ``last_k`` steers the last ``last_k`` prompt positions and every generated
token. The position rule needs absolute positions, which a pre-hook on the decoder reads from the
KV cache length, so it works the same in ``generate`` (prompt pass, then one token per step) and in
a teacher-forced forward over prompt + response, as long as prompts are left-padded to a common
length ``P`` (then position ``P`` is the first response token in every row).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch

from modules.errors import UserError
from modules.models.interventions import HookPoint, SteeringIntervention, decoder_layers, steering_site
from torch import nn

__all__ = ["HookPoint", "SteerPositions", "SteeringVector", "Steering", "decoder_layers", "steering_site"]

SteerPositions = Literal["all", "response", "last_k"]


class SteeringVector(nn.Module):
    """The trainable state: a direction ``v`` and a scale ``alpha`` (fp32 master copies).

    ``alpha`` has shape ``(1,)``, not ``()``: FSDP and DeepSpeed flatten parameters and refuse 0-d
    ones. Vector files keep a 0-d ``alpha``; checkpoints written with a 0-d one still load.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.0, alpha_init: float = 1.0, train_alpha: bool = True):
        super().__init__()
        self.v = nn.Parameter(torch.randn(hidden_size) * init_std if init_std > 0 else torch.zeros(hidden_size))
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)), requires_grad=train_alpha)

    @torch.no_grad()
    def load_(self, v: torch.Tensor, alpha: torch.Tensor) -> "SteeringVector":
        """Copy saved values in (e.g. from a portable vector file)."""
        self.v.copy_(v)
        self.alpha.copy_(torch.as_tensor(alpha).reshape(1))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and alpha.dim() == 0:  # a checkpoint from before alpha became 1-D
            state_dict[prefix + "alpha"] = alpha.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def delta(self) -> torch.Tensor:
        """The vector that is added to the hidden state: ``alpha * v``."""
        return self.alpha * self.v

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        """``alpha * v`` in the dtype of ``like`` (the hidden state it is added to), as a module
        call: the steering hook uses this, so that a sharded vector (``--trainer.strategy fsdp``) is
        gathered for it (FSDP2 needs a tensor argument to find the device)."""
        return self.delta().to(like.dtype)


class Steering(SteeringIntervention):
    """Adds ``alpha * v`` at one site of ``model`` while enabled; a context manager switches it off.

    Args:
        model: The frozen causal LM (Llama/Qwen/Mistral-style decoder layers).
        vector: The trainable :class:`SteeringVector`.
        layer: Decoder layer index (0-based).
        hook_point: ``post_attn_norm``, ``pre_attn_norm`` or ``layer_output``.
        positions: ``all``, ``response`` or ``last_k`` (see the module docstring).
        last_k: Number of final prompt positions steered when ``positions == "last_k"``.
    """

    def __init__(
        self,
        model: nn.Module,
        vector: SteeringVector,
        layer: int,
        hook_point: HookPoint = "post_attn_norm",
        positions: SteerPositions = "all",
        last_k: int = 1,
    ) -> None:
        if positions not in ("all", "response", "last_k"):
            raise UserError(f"unknown steering positions '{positions}': use all, response or last_k")
        super().__init__(layer)
        self.vector = vector
        self.hook_point, self.positions, self.last_k = hook_point, positions, last_k
        self.prompt_offset = {"all": None, "response": 1, "last_k": last_k}[positions]
        self.record_site_norm = False
        self.site_norm: float | None = None
        self._prompt_len: int | None = None
        self._register(steering_site(model, layer, hook_point), self._add)
        if self.prompt_offset is not None:
            self._track_positions(model)

    # -- switches (``disabled`` and ``remove`` come from :class:`Intervention`) --------------------
    @contextmanager
    def prompt_length(self, length: int) -> Iterator[None]:
        """Tell the position rule where the (left-padded) prompts end, for one generate/forward."""
        previous, self._prompt_len = self._prompt_len, length
        try:
            yield
        finally:
            self._prompt_len = previous

    # -- what the engine reads -----------------------------------------------------------------
    def steering_delta(self) -> torch.Tensor:
        return self.vector.delta()

    def steering_tensors(self) -> list[torch.Tensor]:
        return [self.vector.v, self.vector.alpha]

    def first_steered_column(self) -> int:
        """First steered absolute column: the position rule (``-1`` = every column)."""
        if self.prompt_offset is None:
            return -1
        if self._prompt_len is None:
            raise RuntimeError("steering positions other than 'all' need Steering.prompt_length(P) around the call")
        return int(self._prompt_len) - int(self.prompt_offset)

    # -- hooks ---------------------------------------------------------------------------------
    def _add(self, module, inputs, output):
        if isinstance(output, tuple):  # a decoder layer (``layer_output``) may return (hidden, ...)
            return (self._add(module, inputs, output[0]), *output[1:])
        if self.record_site_norm:
            self.site_norm = float(output.detach().float().norm(dim=-1).median())
        if not self.enabled:
            return output
        delta = self.vector(output)
        if self.prompt_offset is None:
            return output + delta
        first = self.first_steered_column()
        positions = torch.arange(output.shape[1], device=output.device) + self._chunk_start
        mask = (positions >= first).to(output.dtype)[None, :, None]
        return output + mask * delta
