"""The data of one on-policy cycle: the prompts of a rollout batch, the experience built from
them, and the learning-rate schedule over updates (used by :mod:`modules.on_policy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from modules.rewards import Rewards
from modules.rollout import Rollout

LRSchedule = Literal["constant", "linear", "cosine"]


@dataclass
class PromptBatch:
    """Prompts of one rollout batch, chat template applied and left-padded."""

    index: int
    """Position of this rollout batch in the prompt schedule (seeds the rollouts)."""
    prompts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    records: list[dict] = field(default_factory=list)
    """The data row each prompt came from (reference answers, baseline replies, precomputed rewards)."""

    def split(self, size: int) -> list["PromptBatch"]:
        parts = []
        for start in range(0, len(self.prompts), size):
            ids, mask = self.input_ids[start : start + size], self.attention_mask[start : start + size]
            keep = int(mask.sum(0).nonzero()[0]) if mask.any() else 0  # drop all-padding columns
            parts.append(PromptBatch(self.index, self.prompts[start : start + size], ids[:, keep:], mask[:, keep:],
                                     self.records[start : start + size]))
        return parts

    def repeat(self, times: int) -> "PromptBatch":
        """Every prompt ``times`` times in a row (the samples of one group)."""
        if times == 1:
            return self
        return PromptBatch(self.index, [p for p in self.prompts for _ in range(times)],
                           self.input_ids.repeat_interleave(times, 0), self.attention_mask.repeat_interleave(times, 0),
                           [r for r in self.records for _ in range(times)])

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.index, self.prompts, self.input_ids.to(device), self.attention_mask.to(device),
                           self.records)


@dataclass
class Experience:
    """Rows of a rollout batch (a micro-batch, the whole batch, or a minibatch) and what the update needs."""

    rollout: Rollout
    rewards: Rewards
    group: torch.Tensor
    """[B] group id: rows sampled from the same prompt share it (unique within a rollout batch)."""
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    """From the score pass: per-row [B, ...], per-token [B, R, ...] (R = response width) or
    per-position [B, P + R, ...] tensors (P = prompt width: over prompt and response columns)."""
    advantages: torch.Tensor | None = None
    """[B] (one per reply) or [B, R] (per token)."""
    returns: torch.Tensor | None = None
    """[B, R] value targets (methods with a value head)."""

    @property
    def valid(self) -> torch.Tensor:
        return self.rewards.valid

    def _per_token(self, t: torch.Tensor) -> bool:
        return t.dim() >= 2 and tuple(t.shape[:2]) == tuple(self.rollout.response_ids.shape)

    def _per_position(self, t: torch.Tensor) -> bool:
        rows, prompt_width = self.rollout.prompt_ids.shape
        return t.dim() >= 2 and tuple(t.shape[:2]) == (rows, prompt_width + self.rollout.response_ids.shape[1])

    def select(self, rows: torch.Tensor) -> "Experience":
        """The given rows; prompt columns that are padding in every selected row and response
        columns beyond the longest selected reply are dropped (as :meth:`Rollout.select` does)."""
        rollout = self.rollout.select(rows)
        width = rollout.response_ids.shape[1]
        first = self.rollout.prompt_ids.shape[1] - rollout.prompt_ids.shape[1]  # prompt columns dropped
        end = self.rollout.prompt_ids.shape[1] + width

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            picked = t[rows.to(t.device)]
            if self._per_token(t):
                return picked[:, :width]
            return picked[:, first:end] if self._per_position(t) else picked

        return Experience(rollout, self.rewards.select(rows), self.group[rows.to(self.group.device)],
                          {k: pick(v) for k, v in self.scores.items()}, pick(self.advantages), pick(self.returns))

    @staticmethod
    def concat(parts: list["Experience"], pad_id: int) -> "Experience":
        """Rows of several experiences (scored, before advantages), re-padded to common widths."""
        rollout = Rollout.concat([p.rollout for p in parts], pad_id)
        prompt_width, width = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]

        def pad(t: torch.Tensor, left: int, right: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (left, right))

        def cat(key: str) -> torch.Tensor:
            tensors = [p.scores[key] for p in parts]
            if all(p._per_token(t) for p, t in zip(parts, tensors)):
                tensors = [pad(t, 0, width - t.shape[1]) for t in tensors]
            elif all(p._per_position(t) for p, t in zip(parts, tensors)):  # prompts left-, replies right-padded
                tensors = [pad(t, prompt_width - p.rollout.prompt_ids.shape[1], width - p.rollout.response_ids.shape[1])
                           for p, t in zip(parts, tensors)]
            return torch.cat(tensors)

        keys = [k for k in parts[0].scores if all(k in p.scores for p in parts)]
        return Experience(rollout, Rewards.concat([p.rewards for p in parts]), torch.cat([p.group for p in parts]),
                          {k: cat(k) for k in keys})


def lr_factor(update: int, total: int, warmup: int, schedule: LRSchedule) -> float:
    """Multiplier of the learning rate after ``update`` completed updates (linear warm-up first)."""
    if warmup > 0 and update < warmup:
        return (update + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
