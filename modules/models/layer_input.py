"""Start a decoder's forward at layer ``k``: how two passes share the layers below an intervention.

An intervention that enters inside decoder layer ``k`` (a steering vector at its input or
post-attention norm) leaves layers ``0..k-1`` alone: the hidden states entering layer ``k`` are the
same with it on or off. The reference pass keeps them (:func:`recording_layer_input`) and the
policy's pass over the same tokens starts from them (:func:`starting_at_layer`) instead of running
the lower layers again. The layers above ``k`` see exactly what a full forward would give them (the
same operations on the same numbers), so the result is the full forward's.

Both work through module hooks and any architecture whose decoder calls its layers in order with
the hidden states as first argument (every ``transformers`` decoder): the embedding, position and
mask computations of the decoder still run (cheap); the skipped layers return their input.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from modules.models.steering import decoder_layers


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def recording_layer_input(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Forwards inside append the hidden states entering decoder layer ``layer`` (detached) to
    the yielded list."""
    seen: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        seen.append(_hidden_argument(args, kwargs).detach())

    handle = decoder_layers(model)[layer].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


@contextmanager
def starting_at_layer(model: nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Forwards inside skip decoder layers below ``layer``; ``hidden`` ([B, T, d], recorded by
    :func:`recording_layer_input` over the same token ids) enters layer ``layer`` instead."""
    layers = decoder_layers(model)
    if layer == 0:  # nothing below to skip: the embedding is the input
        yield
        return

    def feed(module, args, kwargs):
        arriving = _hidden_argument(args, kwargs)
        if arriving.shape != hidden.shape:
            raise ValueError(f"the recorded input of layer {layer} has shape {tuple(hidden.shape)}, "
                             f"this forward's {tuple(arriving.shape)}: record it over the same tokens")
        given = hidden.to(arriving.dtype)
        if args:
            return (given, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": given}

    own_forward = [layers[i].__dict__.get("forward") for i in range(layer)]
    for i in range(layer):
        layers[i].forward = _pass_through
    handle = layers[layer].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, forward in enumerate(own_forward):
            if forward is None:
                del layers[i].forward
            else:
                layers[i].forward = forward
