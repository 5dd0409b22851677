"""KL(p_policy || p_ref) on response tokens: the exact form, the sampled estimators, and the KL term
a method adds to its objective, chosen once from ``kl_estimator``.

The estimators from sampled tokens are Schulman's (2020, "Approximating KL divergence",
joschu.net/blog/kl-approx.html): k1, the sampled log-ratio ``log p(y_t) - log p_ref(y_t)``, and k3,
``r - 1 - log r`` with ``r = p_ref / p``. Both are unbiased estimates of KL(p || p_ref) in value,
but they differ as losses. k1 used *directly as a loss term* has zero expected gradient
(``E_p[grad log p] = 0``) and constrains nothing, so it is never one. The KL terms
(:data:`KL_TERMS`, picked by :func:`kl_term`) are:

- ``exact``: sum over the vocabulary of ``p (log p - log p_ref)`` at every response position,
  differentiable through ``p`` (needs both sets of logits, computed in chunks).
- ``k3``: k3 at the sampled tokens, as a loss term. Its expected gradient is that of
  ``KL(p_ref || p)`` (the reverse direction), a valid regulariser that needs no reference logits
  over the vocabulary, only the reference log-prob of each token.
- ``reward``: k1 is *not* a loss term: it is subtracted from the reward
  (``R - kl_coef * sum_t log p/p_ref``), so the score-function gradient of the policy-gradient loss
  carries it; its expected gradient is that of ``KL(p || p_ref)`` at the sequence level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from modules.errors import UserError

KLEstimator = Literal["exact", "k3", "reward"]


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(softmax(logits) || softmax(ref_logits))`` over the last dim, in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate ``exp(log_ref - log_p) - (log_ref - log_p) - 1`` (always >= 0)."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1.0


def sampled_log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate ``log p - log p_ref`` at the sampled tokens (an estimate of KL, never a loss)."""
    return logp - ref_logp


@dataclass(frozen=True)
class KLTerm:
    """How a method keeps its policy near the reference: a per-token loss term, or a reward penalty."""

    full_kl: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    """The per-position KL that the loss pass computes from both sets of logits (``exact_kl``), or
    None: the reference's hidden states are then not kept for the loss pass."""
    token_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    """``(logp, ref_logp, full_kl) ->`` the per-token term added to the loss (before its
    coefficient); zeros when the KL is in the reward."""
    in_reward: bool
    """The sampled log-ratio is subtracted from the reward (before the advantages) instead."""

    @property
    def compares_logits(self) -> bool:
        """Whether the loss pass needs the reference's hidden states (to compute ``full_kl``)."""
        return self.full_kl is not None


def _exact_loss(logp: torch.Tensor, ref_logp: torch.Tensor, full_kl: torch.Tensor | None) -> torch.Tensor:
    return full_kl


def _k3_loss(logp: torch.Tensor, ref_logp: torch.Tensor, full_kl: torch.Tensor | None) -> torch.Tensor:
    return k3_kl(logp, ref_logp)


def _no_loss(logp: torch.Tensor, ref_logp: torch.Tensor, full_kl: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(logp)


KL_TERMS: dict[str, KLTerm] = {
    "exact": KLTerm(exact_kl, _exact_loss, in_reward=False),
    "k3": KLTerm(None, _k3_loss, in_reward=False),
    "reward": KLTerm(None, _no_loss, in_reward=True),
}
"""``kl_estimator`` -> its :class:`KLTerm`."""


def kl_term(estimator: KLEstimator) -> KLTerm:
    """The KL term for ``estimator``, chosen once (in a method's ``__init__``)."""
    if estimator not in KL_TERMS:
        raise UserError(f"unknown kl_estimator '{estimator}': use one of {', '.join(KL_TERMS)}")
    return KL_TERMS[estimator]
