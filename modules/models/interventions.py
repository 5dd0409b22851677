"""One protocol for the project's interventions on a frozen decoder, read by HF and by the engine.

An :class:`Intervention` acts on one decoder layer. It is registered as forward hooks on the model
(so HF ``forward``/``generate`` run it through its hooks), has an on/off switch (``enabled`` and the
:meth:`Intervention.disabled` context manager) and is removed with :meth:`Intervention.remove`. The
hook plumbing (registering, tracking the absolute position of a chunk, removing) is written here once.

The rollout engine (:mod:`modules.engine`) runs its own forward and does not call hooks; it finds
the interventions by their hooks' owners and runs each by calling a method of the intervention:

- :class:`SteeringIntervention` (:class:`modules.models.steering.Steering`): adds
  :meth:`~SteeringIntervention.steering_delta` to the output of a norm of layer ``layer``, or to the
  layer's own output (the residual stream), as ``hook_point`` says, at the absolute columns ``>= first_steered_column()`` (``-1``: every column);
- :class:`InjectionIntervention` (the oracle's ``ActivationInjection``): adds
  norm-matched vectors at chosen absolute positions of the output of layer ``layer``; the engine calls
  :meth:`~InjectionIntervention.apply_to_prompt_pass` on the prompt pass (the hook does the same math
  on each chunk, through :func:`add_at_positions`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import UserError

HookPoint = Literal["post_attn_norm", "pre_attn_norm", "layer_output"]
_SITE_NAMES = {"post_attn_norm": "post_attention_layernorm", "pre_attn_norm": "input_layernorm",
               "layer_output": None}
"""hook point -> the attribute of a decoder layer whose output is steered; ``layer_output`` is the
layer itself (its output is the residual stream after the layer, where llama.cpp adds a control
vector)."""


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder (the module that holds the layers) of a causal LM, or the model itself."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (also through a peft wrapper)."""
    layers = getattr(decoder_of(model), "layers", None)
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
    if _SITE_NAMES[hook_point] is None:
        return layers[layer]
    site = getattr(layers[layer], _SITE_NAMES[hook_point], None)
    if site is None:
        raise UserError(f"layer {layer} of {type(model).__name__} has no {_SITE_NAMES[hook_point]} to steer")
    return site


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


class Intervention:
    """An intervention on decoder layer ``layer``, registered as forward hooks, with an on/off switch.

    Subclasses register their hooks with :meth:`_register` (bound methods, so that whoever walks the
    model's hooks finds the intervention as the hook's ``__self__``) and, when they need absolute
    positions, :meth:`_track_positions`, which keeps ``self._chunk_start`` (the number of tokens the
    KV cache held before the current chunk) up to date.
    """

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.enabled = True
        self._chunk_start = 0
        self._handles: list = []

    # -- switches ------------------------------------------------------------------------------
    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The model without this intervention (same weights), inside the block."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def remove(self) -> None:
        """Unregister every hook (the intervention is gone from the model)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- plumbing ------------------------------------------------------------------------------
    def _register(self, module: nn.Module, hook: Callable, *, pre: bool = False, with_kwargs: bool = False) -> None:
        if pre:
            handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)

    def _track_positions(self, model: nn.Module) -> None:
        """Keep ``self._chunk_start`` with a pre-hook on the decoder."""
        self._register(decoder_of(model), self._track_position, pre=True, with_kwargs=True)

    def _track_position(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            self._chunk_start = int(cache_position[0])
        else:
            self._chunk_start = int(cache.get_seq_length()) if cache is not None else 0


class SteeringIntervention(Intervention):
    """Adds :meth:`steering_delta` to the output of the ``hook_point`` site of layer ``layer``, at the
    absolute columns ``>= first_steered_column()``. The engine adds it in its own forward."""

    hook_point: HookPoint

    def steering_delta(self) -> torch.Tensor:
        """The vector added (d_model), read in place: a captured decode step sees later updates."""
        raise NotImplementedError

    def steering_tensors(self) -> list[torch.Tensor]:
        """The tensors :meth:`steering_delta` reads (their storage must stay put for a captured step)."""
        raise NotImplementedError

    def first_steered_column(self) -> int:
        """The first steered absolute column for the current call; ``-1`` steers every column."""
        return -1


def norm_matched_delta(h: torch.Tensor, v: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """``coefficient * ||h|| * v / ||v||`` over the last dim, in fp32 (the term added to ``h``)."""
    return coefficient * h.float().norm(dim=-1, keepdim=True) * F.normalize(v.float(), dim=-1)


def add_at_positions(h: torch.Tensor, vectors: torch.Tensor, positions: torch.Tensor, chunk_start: int,
                     coefficient: float) -> torch.Tensor | None:
    """``h`` [B, T, d] (a chunk starting at absolute column ``chunk_start``) with
    :func:`norm_matched_delta` of ``vectors`` [B, K, d] added at the absolute ``positions`` [B, K]
    (-1 = unused slot) that fall in the chunk; ``None`` when none does. The added term is detached and
    the sum formed in fp32; rows/positions without a vector keep ``h`` exactly (h + 0 in fp32)."""
    batch, length, _ = h.shape
    positions = positions.to(h.device)
    relative = positions - chunk_start
    live = (positions >= 0) & (relative >= 0) & (relative < length)
    if not bool(live.any()):
        return None
    index = relative.clamp(0, length - 1)[..., None].expand(-1, -1, h.shape[-1])
    original = h.gather(1, index)
    delta = norm_matched_delta(original, vectors.to(h.device), coefficient)
    delta = (delta * live[..., None]).detach()
    added = torch.zeros(h.shape, dtype=torch.float32, device=h.device).scatter_add(1, index, delta)
    return (h.float() + added).to(h.dtype) if h.dtype != torch.float32 else h + added


class InjectionIntervention(Intervention):
    """Adds norm-matched ``vectors`` [B, K, d] at absolute ``positions`` [B, K] (-1 = unused) of the
    output of decoder layer ``layer``, while ``vectors`` is set and the switch is on.

    Subclasses set ``vectors``/``positions`` (e.g. inside a context manager) and call
    :meth:`_attach`. The HF path runs :meth:`_inject` as a forward hook on the layer; the engine calls
    :meth:`apply_to_prompt_pass` on its prompt pass.
    """

    def __init__(self, model: nn.Module, layer: int, coefficient: float = 1.0) -> None:
        super().__init__(layer)
        self.coefficient = coefficient
        self.vectors: torch.Tensor | None = None
        """[B, K, d] vectors being injected (None when nothing is)."""
        self.positions: torch.Tensor | None = None
        """[B, K] long, absolute positions in the left-padded input; -1 = unused slot."""
        self.calls = 0
        """Chunks in which at least one position was injected (a test and debugging aid)."""
        self._track_positions(model)
        self._register(decoder_layers(model)[layer], self._inject)

    @property
    def pending(self) -> bool:
        """Switched on and holding vectors: a forward now would inject."""
        return self.enabled and self.vectors is not None

    def _add(self, h: torch.Tensor, chunk_start: int) -> torch.Tensor:
        batch = h.shape[0]
        if batch != self.vectors.shape[0]:
            raise RuntimeError(f"the injection holds {self.vectors.shape[0]} rows but the forward has {batch}")
        new = add_at_positions(h, self.vectors, self.positions, chunk_start, self.coefficient)
        if new is None:
            return h
        self.calls += 1
        return new

    def apply_to_prompt_pass(self, hidden: torch.Tensor, layer_index: int,
                             rows: torch.Tensor | None = None) -> torch.Tensor:
        """The output of decoder layer ``layer_index`` over a whole prompt pass (absolute column 0
        first), with this injection applied as its hook applies it; unchanged at other layers.
        ``rows``: the pass holds only these rows of the batch (a prompt pass shared by equal rows)."""
        if layer_index != self.layer or not self.pending:
            return hidden
        if rows is None:
            return self._add(hidden, 0)
        new = add_at_positions(hidden, self.vectors[rows], self.positions[rows], 0, self.coefficient)
        self.calls += new is not None
        return hidden if new is None else new

    def same_rows(self) -> torch.Tensor | None:
        """[B-1] bool: row ``i+1`` is injected exactly as row ``i`` (None: nothing is injected)."""
        if not self.pending:
            return None
        same_vectors = (self.vectors[1:] == self.vectors[:-1]).flatten(1).all(-1)
        return same_vectors & (self.positions[1:] == self.positions[:-1]).all(-1)

    def _inject(self, module, args, output):
        if not self.pending:
            return output
        h = _hidden(output)
        new = self._add(h, self._chunk_start)
        if new is h:
            return output
        return (new, *output[1:]) if isinstance(output, tuple) else new
