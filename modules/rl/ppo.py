"""PPO's tensor math as pure functions over padded [B, R] per-token tensors and a response mask.

The definitions follow TRL's ``PPOTrainer`` where they overlap (names in brackets; checked against
``trl/experimental/ppo/ppo_trainer.py`` at huggingface/trl f2cd577, 1.10.0.dev0):

- per-token rewards [rewards]: ``-kl_coef * kl_t`` at every response token (k1: ``logp - ref``),
  plus the sequence's score at its last response token (the end-of-turn token when one was
  sampled: the response mask includes it) — *not* TRL's position, see departure 1;
- GAE [advantages, returns]: ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last
  token is 0), ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V`` (before whitening);
- whitening [masked_whiten]: ``(x - mean) / sqrt(var + 1e-8)`` with the unbiased masked variance;
- clipped surrogate [pg_loss]: ``mean_t max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))`` and
  ``clipfrac`` = share of tokens where the clipped term is the larger;
- clipped value loss [vf_loss]: ``0.5 * mean_t max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``;
- means are over the response tokens of a minibatch (token-level).

Where these depart from TRL:

1. The score's position and the end-of-sequence token. TRL with ``stop_token: eos`` (the setting
   like ours; its default, None, samples past EOS up to ``response_length``) cuts a response after
   its first EOS, takes ``s`` = (index of its first pad token) - 1 (the last index when it
   has none), keeps log-probs (policy loss, KL rewards: ``INVALID_LOGPROB`` beyond ``s`` gives a KL
   of 0) and the advantage whitening to indices <= ``s``, values and the value loss to <= ``s + 1``,
   and adds the score at ``s + 1`` (at ``s`` when ``s + 1`` is past the batch's response width).
   We use one mask, the response up to and including its first end-of-turn token, for all of
   them, and add the score at its last token. For a reply whose EOS is at index ``e``:

   - pad == EOS (SmolLM2's tokenizer, among others): TRL's ``s = e - 1``. The score lands on ``e``
     in both, but TRL leaves the EOS's log-prob out of the policy loss and the whitening and gives
     it no KL reward. Ours: ``r_e = score - kl_coef * kl_e`` (TRL: ``score``); the advantages at
     ``e`` and, through ``gamma * lam``, before it differ by that term; the whitening statistics
     include ``A_e``; the policy loss includes the EOS token.
   - pad != EOS: TRL's ``s = e``: the EOS is in the policy loss as ours, but the score lands one
     position later, on the pad at ``e + 1``, whose value TRL trains toward it. TRL:
     ``r_e = -kl_coef * kl_e``, ``A_e = r_e + gamma * V_{e+1} - V_e + gamma * lam * (score - V_{e+1})``;
     ours: ``r_e = score - kl_coef * kl_e``, ``A_e = r_e - V_e``; returns and the value loss differ too.

   Rows that end without an EOS (cut at ``max_new_tokens``) and a reply that fills the batch's
   whole width get the score on their last token in both. We also end replies at every end-of-turn
   id of the generation config, where TRL truncates at ``eos_token_id`` only; TRL's
   ``missing_eos_penalty`` is not offered.
2. Whitening (advantages, and rewards with ``whiten_rewards``) is over the rollout batch of every
   rank (``reduce``); TRL whitens each rank's batch alone, and its rewards over indices <= ``s + 1``.
3. Precision: log-probs come from fp32 logits, values from a value head run in fp32, and rewards,
   advantages and returns are fp32; TRL keeps the model's dtype (bf16 under bf16 training).
4. 0 where TRL gives NaN: whitening over a single token gives 0 (TRL's Bessel factor divides by
   0: NaN) and over none gives 0 (TRL raises); a token mean over no token is 0 (ours: a chunk whose
   replies are all invalid, which then adds no gradient; TRL's ``masked_mean`` gives NaN).

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
