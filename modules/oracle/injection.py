"""Reading the subject's activations, and injecting them into the oracle's prompt pass.

One model serves both roles: with its LoRA adapter disabled it is the *subject*, with the adapter
enabled it is the *oracle*.

- :func:`extract_activations` runs the subject (every adapter off, no injection) on a batch of
  contexts and returns the residual stream, the output of decoder layer ``layer`` (0-based), at
  chosen positions. Rows may read different layers; one forward serves all of them and stops after
  the deepest layer needed.
- :class:`ActivationInjection` is the oracle's intervention, shaped like
  :class:`modules.models.steering.Steering`: forward hooks stay registered, and the injection acts
  only inside ``with injection.inject(vectors, positions):`` around one ``forward`` or ``generate``
  call. At the output of decoder layer 1, at the placeholder positions only, it adds
  ``||h|| * v / ||v||`` to ``h`` (coefficient 1). A pre-hook on the decoder reads how many tokens the
  KV cache already holds, so positions are absolute: the prompt pass (or a teacher-forced pass over
  prompt + response) is injected, cached decoding steps (which hold no placeholder) are not.

The batch being injected lives in two tensors on the model's device, ``injection.vectors`` [B, K, d]
and ``injection.positions`` [B, K] (absolute indices into the left-padded input; -1 marks an unused
slot where a row has fewer than K placeholders). A faster rollout engine can read them in place.

Verified against the public code (adamkarvonen/activation_oracles, 55f153f):
``nl_probes/utils/steering_hooks.py`` ``get_hf_activation_steering_hook`` adds
``normalize(v) * ||h[pos]|| * coefficient`` to ``h[pos]`` at the output of the hooked layer, with the
added vector detached (gradients flow through ``h`` only), and returns early when the chunk has one
token (decoding); ``nl_probes/sft.py`` and ``nl_probes/utils/eval.py`` hook ``layers[hook_onto_layer]``
(= 1) for both training forwards and ``generate``.

Departures:

1. Decoding is recognised by absolute position (cache length + index within the chunk), not by a
   chunk of length 1: a one-token teacher-forced chunk or a chunked prefill is still handled right.
2. Vectorised over the batch (a gather and a scatter-add) instead of a Python loop over rows; the
   sum is formed in fp32 and cast to the model's dtype, where the public hook casts the added term.
3. No early exit by exception during injection; extraction does stop after the deepest layer read.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from modules.models.interventions import InjectionIntervention, decoder_layers, norm_matched_delta
from modules.oracle.scheme import INJECTION_LAYER, STEERING_COEFFICIENT

__all__ = ["ActivationInjection", "extract_activations", "norm_matched_delta", "subject_context"]


def subject_context(model: nn.Module) -> Callable[[], ContextManager]:
    """A context that switches every adapter off (the subject): peft's ``disable_adapter`` when the
    model has one, else nothing (a plain model is its own subject)."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter
    return nullcontext


class _Stop(Exception):
    """Ends the subject's forward once the deepest needed layer has run."""


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def extract_activations(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    positions: torch.Tensor,
    subject: Callable[[], ContextManager] | None = None,
) -> torch.Tensor:
    """The subject's residual stream at chosen positions.

    Args:
        input_ids, attention_mask: [B, T] left-padded contexts.
        layers: The decoder layer (0-based) each row reads, length B.
        positions: [B, K] indices into the padded rows; -1 marks an unused slot (returned as zeros).
        subject: Context that turns the model into the subject (default: :func:`subject_context`).

    Returns:
        [B, K, d] activations (the model's dtype), detached.
    """
    all_layers = decoder_layers(model)
    needed = sorted(set(int(layer) for layer in layers))
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, output):
            captured[layer] = _hidden(output)
            if layer == needed[-1]:
                raise _Stop

        return hook

    handles = [all_layers[layer].register_forward_hook(hook_for(layer)) for layer in needed]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    try:
        with (subject or subject_context(model))():
            try:
                model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    batch, k = positions.shape
    out = None
    for row, layer in enumerate(layers):
        acts = captured[int(layer)]
        if out is None:
            out = acts.new_zeros(batch, k, acts.shape[-1])
        keep = positions[row] >= 0
        out[row, keep] = acts[row, positions[row][keep]]
    return out.detach()


class ActivationInjection(InjectionIntervention):
    """Adds the subject's activations at the oracle's placeholders (see the module docstring).

    The hooks, the switch and the add itself are :class:`InjectionIntervention`'s (shared with the
    engine, which calls :meth:`apply_to_prompt_pass`); this class adds the public scheme's defaults
    and :meth:`inject`.

    Args:
        model: The oracle (a causal LM, peft-wrapped or not); hooks go on its decoder.
        layer: Decoder layer whose output is injected (the public scheme: 1).
        coefficient: Scale of the norm-matched vector (the public scheme: 1.0).
    """

    def __init__(self, model: nn.Module, layer: int = INJECTION_LAYER, coefficient: float = STEERING_COEFFICIENT):
        super().__init__(model, layer, coefficient)

    @contextmanager
    def inject(self, vectors: torch.Tensor, positions: torch.Tensor) -> Iterator["ActivationInjection"]:
        """Inject ``vectors`` [B, K, d] at ``positions`` [B, K] for the forward/generate calls inside."""
        if vectors.dim() != 3 or positions.shape != vectors.shape[:2]:
            raise ValueError(f"vectors must be [B, K, d] and positions [B, K]; got {tuple(vectors.shape)} "
                             f"and {tuple(positions.shape)}")
        previous = self.vectors, self.positions
        self.vectors, self.positions = vectors, positions.long()
        try:
            yield self
        finally:
            self.vectors, self.positions = previous
