"""A trainable steering vector added at one site of a frozen decoder, as a switchable intervention.

``SteeringVector`` holds the trainable state, ``v`` (d_model) and the scalar ``alpha``, in fp32.
``Steering`` attaches it to a model with a forward hook and is the switch:

    steering = Steering(model, SteeringVector(d), layer=16, hook_point="post_attn_norm")
    with steering.disabled():      # the reference model: same weights, no steering
        ...

Hook points (module names as in Llama, Mistral and Qwen decoder layers):

- ``post_attn_norm``: add ``alpha * v`` to the output of the layer's post-attention RMSNorm
  (the input of the MLP);
- ``pre_attn_norm``: add it to the output of the layer's input RMSNorm (the input of attention).

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
from torch import nn

HookPoint = Literal["post_attn_norm", "pre_attn_norm"]
SteerPositions = Literal["all", "response", "last_k"]
_SITE_NAMES = {"post_attn_norm": "post_attention_layernorm", "pre_attn_norm": "input_layernorm"}


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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (also through a peft wrapper)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UserError(f"cannot find decoder layers in {type(model).__name__}: expected model.get_decoder().layers")
    return layers


def steering_site(model: nn.Module, layer: int, hook_point: HookPoint) -> nn.Module:
    """The module whose output is steered."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UserError(f"hook_layer {layer} is out of range: the model has {len(layers)} layers (0-based)")
    if hook_point not in _SITE_NAMES:
        raise UserError(f"unknown hook_point '{hook_point}': use one of {', '.join(_SITE_NAMES)}")
    site = getattr(layers[layer], _SITE_NAMES[hook_point], None)
    if site is None:
        raise UserError(f"layer {layer} of {type(model).__name__} has no {_SITE_NAMES[hook_point]} to steer")
    return site


class Steering:
    """Adds ``alpha * v`` at one site of ``model`` while enabled; a context manager switches it off.

    Args:
        model: The frozen causal LM (Llama/Qwen/Mistral-style decoder layers).
        vector: The trainable :class:`SteeringVector`.
        layer: Decoder layer index (0-based).
        hook_point: ``post_attn_norm`` or ``pre_attn_norm``.
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
        self.vector = vector
        self.layer, self.hook_point, self.positions, self.last_k = layer, hook_point, positions, last_k
        self.prompt_offset = {"all": None, "response": 1, "last_k": last_k}[positions]
        self.enabled = True
        self.record_site_norm = False
        self.site_norm: float | None = None
        self._prompt_len: int | None = None
        self._chunk_start = 0
        self._handles = [steering_site(model, layer, hook_point).register_forward_hook(self._add)]
        if self.prompt_offset is not None:
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
            self._handles.append(decoder.register_forward_pre_hook(self._track_position, with_kwargs=True))

    # -- switches ------------------------------------------------------------------------------
    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The reference model: the same weights with the steering switched off."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @contextmanager
    def prompt_length(self, length: int) -> Iterator[None]:
        """Tell the position rule where the (left-padded) prompts end, for one generate/forward."""
        previous, self._prompt_len = self._prompt_len, length
        try:
            yield
        finally:
            self._prompt_len = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks ---------------------------------------------------------------------------------
    def _track_position(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            self._chunk_start = int(cache_position[0])
        else:
            self._chunk_start = int(cache.get_seq_length()) if cache is not None else 0

    def _add(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self.record_site_norm:
            self.site_norm = float(output.detach().float().norm(dim=-1).median())
        if not self.enabled:
            return output
        delta = self.vector(output)
        if self.prompt_offset is None:
            return output + delta
        if self._prompt_len is None:
            raise RuntimeError("steering positions other than 'all' need Steering.prompt_length(P) around the call")
        first = self._prompt_len - self.prompt_offset
        positions = torch.arange(output.shape[1], device=output.device) + self._chunk_start
        mask = (positions >= first).to(output.dtype)[None, :, None]
        return output + mask * delta
