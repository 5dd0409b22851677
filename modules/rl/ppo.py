"""PPO's tensor math as pure functions over padded [B, R] per-token tensors and a response mask.

The definitions follow TRL's ``PPOTrainer`` where they overlap (names in brackets):

- per-token rewards [rewards]: ``-kl_coef * kl_t`` at every response token, plus the sequence's
  score at its last token (the end-of-turn token when one was sampled);
- GAE [advantages, returns]: ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last
  token is 0), ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V`` (before whitening);
- whitening [masked_whiten]: ``(x - mean) / sqrt(var + 1e-8)`` with the unbiased masked variance;
- clipped surrogate [pg_loss]: ``mean_t max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))`` and
  ``clipfrac`` = share of tokens where the clipped term is the larger;
- clipped value loss [vf_loss]: ``0.5 * mean_t max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``;
- means are over the response tokens of a minibatch (token-level).

Statistics over a rollout batch spread over several ranks take ``reduce`` (a sum over ranks).
"""

from __future__ import annotations

import torch

from modules.rl.advantages import Reduce, no_reduce


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def per_token_rewards(scores: torch.Tensor, kl_penalty: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``-kl_penalty`` at every response token, plus ``scores`` [B] at each row's last token.

    ``kl_penalty`` is already multiplied by its coefficient (zeros when the KL is a loss term).
    """
    rewards = -kl_penalty * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    has_tokens = mask.sum(-1) > 0
    rows = torch.arange(mask.shape[0], device=mask.device)
    return rewards.index_put((rows, last), scores.to(rewards.dtype) * has_tokens, accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns ([B, R] each; 0 beyond the mask)."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    length = values.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  reduce: Reduce = no_reduce) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over masked entries (unbiased variance); 0 beyond the mask."""
    m = mask.to(values.dtype)
    totals = reduce(torch.stack([m.sum(), (values * m).sum()]))
    count = totals[0].clamp(min=1)
    mean = totals[1] / count
    var = reduce(((values - mean) ** 2 * m).sum()) / count
    var = var * count / (count - 1) if totals[0] > 1 else var
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the fraction of clipped tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_token_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_token_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac.detach()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss and the fraction of tokens where clipping bound."""
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    plain = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_token_mean(torch.maximum(plain, clipped), mask)
    clipfrac = masked_token_mean((clipped > plain).float(), mask)
    return loss, clipfrac.detach()


def approx_kl_k3(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(old || new) from tokens sampled by the old policy: ``(r - 1) - log r``."""
    log_ratio = logp - old_logp
    return masked_token_mean(torch.expm1(log_ratio) - log_ratio, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over masked tokens (nan when returns are constant)."""
    def var(x: torch.Tensor) -> torch.Tensor:
        mean = masked_token_mean(x, mask)
        return masked_token_mean((x - mean) ** 2, mask)

    total = var(returns)
    return 1.0 - var(returns - values) / total if total > 0 else torch.tensor(float("nan"))
