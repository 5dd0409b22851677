"""From rewards to advantages: normalisation variants and running statistics, as pure functions.

Rewards come with a ``valid`` mask: a sample whose judge call failed is invalid, gets advantage 0
and is left out of every statistic (never a reward of 0).

Statistics over a whole rollout batch that is spread over several ranks take a ``reduce``
argument: a function that sums a tensor over ranks (the identity on one device; the training
module passes its strategy's all-reduce), so every rank normalises with the same mean and std.
"""

from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sample std (n - 1) over valid entries (0 when fewer than two are valid)."""
    return masked_moments(values, mask)[1]


def masked_moments(values: torch.Tensor, mask: torch.Tensor, reduce: Reduce = no_reduce
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sample std (n - 1) over the valid entries of every rank (std 0 below two entries)."""
    mask = mask.to(values.dtype)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    safe = torch.where(mask.bool(), values, zero)
    totals = reduce(torch.stack([mask.sum(), safe.sum()]))
    count = totals[0]
    mean = totals[1] / count.clamp(min=1)
    squares = reduce(((safe - mean) * mask).pow(2).sum())
    std = (squares / (count - 1).clamp(min=1)).sqrt() if count >= 2 else zero
    return mean, std


def raw_advantages(rewards: torch.Tensor, valid: torch.Tensor, reduce: Reduce = no_reduce) -> torch.Tensor:
    """The reward itself (the seed's ``use_reward_normalization=false``); invalid samples get 0."""
    return torch.where(valid, rewards, torch.zeros_like(rewards))


def zscore_advantages(rewards: torch.Tensor, valid: torch.Tensor, reduce: Reduce = no_reduce,
                      eps: float = 1e-6) -> torch.Tensor:
    """``(R - mean) / (std + eps)`` over the valid samples of the rollout batch; invalid samples get 0."""
    mean, std = masked_moments(rewards, valid, reduce)
    return torch.where(valid, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def advantage_fn(use_reward_normalization: bool) -> Callable[..., torch.Tensor]:
    return zscore_advantages if use_reward_normalization else raw_advantages


def ema_update(ema: float | None, value: float, decay: float) -> float:
    """Exponential moving average; the first value starts it."""
    return value if ema is None else decay * ema + (1.0 - decay) * value
