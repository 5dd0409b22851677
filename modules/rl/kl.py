"""KL(p_policy || p_ref) on response tokens: the exact form and the estimators that are correct as losses.

Each estimator is a pure function of per-token quantities. Which one a method uses is chosen once,
in its ``__init__``, from :data:`KL_ESTIMATORS`.

A warning that shaped this module: the sampled log-ratio ``log p(y_t) - log p_ref(y_t)`` used
*directly as a loss term* has zero expected gradient (``E_p[grad log p] = 0``) and constrains
nothing. The forms here are:

- ``exact``: sum over the vocabulary of ``p (log p - log p_ref)`` at every response position,
  differentiable through ``p`` (the default; needs both sets of logits, computed in chunks).
- ``k3``: Schulman's ``r - 1 - log r`` with ``r = p_ref / p`` at the sampled tokens, as a loss. Its
  expected gradient is that of ``KL(p_ref || p)`` (the reverse direction), a valid regulariser
  that needs no reference logits over the vocabulary, only the reference log-prob of each token.
- ``reward``: the sampled log-ratio is *not* a loss term: it is subtracted from the reward
  (``R - kl_coef * sum_t log p/p_ref``), so the score-function gradient of the REINFORCE loss
  carries it; its expected gradient is that of ``KL(p || p_ref)`` at the sequence level.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

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
    """Per-token ``log p - log p_ref`` at the sampled tokens (an estimate of KL, never a loss)."""
    return logp - ref_logp


def token_kl_fn(estimator: KLEstimator) -> Callable[..., torch.Tensor]:
    """The per-token KL term a loss adds, for estimators that add one (``reward`` adds none)."""
    return {"exact": exact_kl, "k3": k3_kl}[estimator]
