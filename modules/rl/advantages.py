"""From rewards to advantages: normalisation variants and running statistics, as pure functions.

Rewards come with a ``valid`` mask: a sample whose judge call failed is invalid, gets advantage 0
and is left out of every statistic (never a reward of 0).
"""

from __future__ import annotations

from typing import Callable

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population std over valid entries (0 when fewer than two are valid)."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    if count < 2:
        return values.new_zeros(())
    centered = (values - masked_mean(values, mask)) * mask
    return (centered.pow(2).sum() / (count - 1)).sqrt()


def raw_advantages(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The reward itself (the seed's ``use_reward_normalization=false``); invalid samples get 0."""
    return torch.where(valid, rewards, torch.zeros_like(rewards))


def zscore_advantages(rewards: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(R - mean) / (std + eps)`` over the valid samples of one micro-batch; invalid samples get 0."""
    mean, std = masked_mean(rewards, valid), masked_std(rewards, valid)
    return torch.where(valid, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def advantage_fn(use_reward_normalization: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return zscore_advantages if use_reward_normalization else raw_advantages


def ema_update(ema: float | None, value: float, decay: float) -> float:
    """Exponential moving average; the first value starts it."""
    return value if ema is None else decay * ema + (1.0 - decay) * value
