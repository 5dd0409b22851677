"""Policy-gradient losses and the chunked computation of per-token log-probs and exact KL.

``response_token_stats`` is where memory is bounded: the policy's and the reference's final
hidden states at the response positions are projected to the vocabulary a chunk of tokens at a
time, under activation checkpointing, so that ``tokens x vocab`` logits exist for one chunk only,
in the forward and in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def reinforce_loss(seq_logp: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``-mean_i(A_i * log p(y_i))`` over valid samples; ``seq_logp`` is the summed token log-prob."""
    weights = valid.to(seq_logp.dtype)
    return -(advantages.detach() * seq_logp * weights).sum() / weights.sum().clamp(min=1)


@dataclass
class TokenStats:
    """Per-token statistics of scored tokens ([N] each, row-major over the response mask)."""

    logp: torch.Tensor
    """log p(target) under the policy (at the sampling temperature)."""
    ref_logp: torch.Tensor | None = None
    """log p_ref(target) under the reference (when its hidden states were given)."""
    kl: torch.Tensor | None = None
    """A full-vocabulary divergence from ``full_kl(logits, ref_logits)`` (e.g. the exact KL)."""
    entropy: torch.Tensor | None = None
    """Entropy of the policy's next-token distribution."""


def _chunk_stats(hidden, ref_hidden, targets, weight, temperature: float, kl_fn, with_entropy: bool):
    logits = F.linear(hidden, weight).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    if ref_hidden is None:
        return logp, None, None, entropy
    ref_logits = F.linear(ref_hidden, weight).float() / temperature
    ref_logp = F.log_softmax(ref_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    kl = kl_fn(logits, ref_logits) if kl_fn is not None else None
    return logp, ref_logp, kl, entropy


def response_token_stats(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    lm_head_weight: torch.Tensor,
    temperature: float = 1.0,
    full_kl: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    chunk_tokens: int = 1024,
    entropy: bool = False,
) -> TokenStats:
    """Per-token log-probs of ``targets`` under the policy (and reference), a full-vocab KL, entropy.

    Args:
        hidden: [N, d] final hidden states (after the final norm) that predict ``targets``; only
            the N scored tokens, already gathered.
        ref_hidden: [N, d] the same under the reference (no gradient), or None.
        targets: [N] token ids.
        lm_head_weight: [V, d] the output embedding.
        temperature: Logits are divided by it (the sampling distribution).
        full_kl: ``f(logits, ref_logits) -> [n]`` computed per chunk (e.g. ``exact_kl``), or None.
        chunk_tokens: Tokens per chunk; memory peaks at about ``4 * chunk_tokens * V`` floats.
        entropy: Also return the entropy of the policy's distribution at each token.
    """
    outs: list[tuple] = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        ref = ref_hidden[sl] if ref_hidden is not None else None
        args = (hidden[sl], ref, targets[sl], lm_head_weight, temperature, full_kl, entropy)
        if hidden.requires_grad:
            outs.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            outs.append(_chunk_stats(*args))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    has_ref = ref_hidden is not None

    def cat(i: int, wanted: bool) -> torch.Tensor | None:
        if not wanted:
            return None
        return torch.cat([o[i] for o in outs]) if outs else empty

    return TokenStats(cat(0, True), cat(1, has_ref), cat(2, has_ref and full_kl is not None), cat(3, entropy))


def scatter_to_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] per-token values (row-major over ``mask``) back to a zero-padded [B, R] tensor."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask.bool(), values)


def per_sequence_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] per-token values (row-major over ``mask``) summed per row: [B]."""
    return scatter_to_rows(values, mask).sum(-1)
