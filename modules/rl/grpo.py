"""GRPO and Dr. GRPO as pure tensor functions: group advantages, the clipped objective, loss aggregation.

Checked against TRL's ``GRPOTrainer`` (huggingface/trl at f2cd577, version 1.10.0.dev0:
``trl/trainer/grpo_trainer.py`` — ``_generate_and_score_completions`` for the advantages,
``_compute_loss`` for the objective and the ``loss_type`` aggregations; ``trl/trainer/utils.py``
``nanstd``; ``trl/trainer/grpo_config.py`` for the option meanings). What we match:

- Advantages: ``A_i = r_i - mean(group of i)``, divided by ``std + 1e-4`` for ``scale_rewards``
  ``"group"`` (std within the group) or ``"batch"`` (std over the whole batch, group means still
  subtracted); ``"none"`` is Dr. GRPO's unscaled advantage. The std is Bessel-corrected (TRL's
  ``nanstd``); a group with fewer than two valid samples gets advantage 0.
- Objective per token: ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)`` with
  ``ratio = exp(logp - old_logp)``; with ``beta > 0`` it adds ``beta * k3`` where
  ``k3 = exp(ref - logp) - (ref - logp) - 1`` (TRL's per-token KL; :func:`modules.rl.kl.k3_kl`).
- Aggregation (``loss_type``): ``grpo`` = token mean per reply, then mean over replies;
  ``bnpo`` = token mean over the micro-batch; ``dr_grpo`` = token sum / (replies x
  ``max_completion_length``); ``dapo`` = token sum / completion tokens of the whole generation
  (rollout) batch gathered over ranks (TRL's ``num_items_in_batch``), whichever optimizer step of
  the batch the tokens are in.
- Ranks: DDP (and FSDP, DeepSpeed) average the gradients of the ranks, so a rank's loss is its
  share of the loss of the whole batch times the number of ranks (TRL divides ``dapo``'s
  normaliser by ``num_processes``); the counts in the normalisers are summed over ranks, and the
  gradient equals that of one process on the concatenated batch.

Where we depart from TRL, and why:

1. Invalid samples (a judge that finally failed) get advantage 0 *and no weight*: they are left
   out of every group statistic and every normaliser, and their tokens carry no loss (no KL term
   either). TRL zeroes their advantage (an unscorable completion) but keeps the row: it counts in
   ``grpo``'s mean over replies and in ``dr_grpo``'s replies x ``max_completion_length``, its
   tokens count in ``bnpo``'s token mean and in ``dapo``'s ``num_items_in_batch``, and its KL term
   stays in the loss. With an invalid sample in the batch every ``loss_type`` therefore differs.
2. ``grpo`` and ``dr_grpo`` divide by the valid replies of the whole optimizer step over all ranks
   (:class:`UpdateTotals`), where TRL divides each micro-batch by its own rows and by the number
   of accumulation steps: the same when every reply is valid (TRL's micro-batches have equal
   rows); otherwise ours weighs every valid reply of the step equally, TRL every micro-batch.
   ``dapo`` is TRL's (over all ranks and the whole generation batch: with ``num_minibatches > 1``
   one step's loss is its tokens' sum over the batch's tokens, so the losses of one pass's steps
   add up to the batch's token mean). ``bnpo`` is TRL's per-micro-batch token mean divided by the
   micro-batches of the step (a micro-batch is an ``update_batch_size`` chunk); the mean over
   ranks weighs every rank's micro-batches equally, as TRL's does.
3. ``num_iterations``: on the first pass over a rollout batch the ratio is exactly 1
   (``old_logp = logp.detach()``, as TRL does when ``num_iterations == 1``); later passes use the
   score pass's log-probs (:func:`old_logprobs_for`). TRL takes the generation-time log-probs for
   every pass when ``num_iterations > 1``; those equal ours on the first pass up to rounding.
4. Only the ``token``-level importance ratio; TRL's ``sequence`` level (GSPO), ``delta``
   two-sided clipping, and the ``cispo``/``sapo``/``luspo``/``vespo`` losses are not offered.
5. Log-probs come from logits cast to fp32 (TRL takes the log-softmax in the model's dtype, bf16
   under bf16 training), and rewards and advantages are fp32.
6. A group of one reply has advantage 0 (nothing to compare with), so ``samples_per_prompt`` must
   be at least 2 (:func:`check_group_size`); TRL requires ``num_generations`` >= 2 likewise.

Variants are chosen once, by name, from :data:`REWARD_SCALES` and :data:`LOSS_AGGREGATIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from modules.errors import UserError
from modules.rl.advantages import Reduce, no_reduce
from modules.rl.kl import k3_kl

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
STD_EPS = 1e-4
"""Added to the std before dividing (TRL's constant)."""


# -- groups ------------------------------------------------------------------------------------
def group_ids_for(num_prompts: int, samples_per_prompt: int) -> torch.Tensor:
    """``[0]*G + [1]*G + ...``: the group id of every sample when each prompt is repeated G times."""
    return torch.arange(num_prompts).repeat_interleave(samples_per_prompt)


def check_samples_per_prompt(samples_per_prompt: int, micro_batch_size: int) -> None:
    """Refuse a micro-batch that G does not divide (so micro-batches split only at group boundaries)."""
    if samples_per_prompt < 1:
        raise UserError(f"samples_per_prompt must be >= 1, not {samples_per_prompt}")
    if micro_batch_size % samples_per_prompt:
        raise UserError(f"samples_per_prompt ({samples_per_prompt}) must divide the micro-batch size "
                        f"({micro_batch_size}) so that no group is split across micro-batches")


def check_group_size(samples_per_prompt: int) -> None:
    """Refuse groups of one reply: their advantage is always 0, so training would change nothing."""
    if samples_per_prompt < 2:
        raise UserError(f"GRPO needs samples_per_prompt >= 2, got {samples_per_prompt}: a group of one reply has "
                        "advantage 0, so training would change nothing")


def check_groups_within(group_ids: Sequence[int] | torch.Tensor, chunk_size: int) -> None:
    """Refuse a layout in which a group is not contiguous or straddles two chunks of ``chunk_size``.

    Chunks are consecutive runs of ``chunk_size`` samples: micro-batches, or the shares of ranks.
    """
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if chunk_size < 1:
        raise UserError(f"chunk size must be >= 1, not {chunk_size}")
    where: dict[int, int] = {}
    for index, gid in enumerate(ids):
        chunk = index // chunk_size
        if gid in where and where[gid] != chunk:
            raise UserError(f"group {gid} straddles chunks {where[gid]} and {chunk} (chunk size {chunk_size}); "
                            "make the micro-batch a multiple of samples_per_prompt")
        if gid in where and ids[index - 1] != gid:
            raise UserError(f"group {gid} is not contiguous (sample {index}): keep each group's samples together")
        where[gid] = chunk


def _dense(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if inverse.numel() else 0


def group_stats(rewards: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: the mean and Bessel-corrected std of its group's valid rewards, and their count.

    The std is 0 where the group has fewer than two valid samples.
    """
    index, num_groups = _dense(group_ids.to(rewards.device))
    w = valid.to(rewards.dtype)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add(0, index, w)
    total = torch.zeros_like(count).index_add(0, index, r)
    mean = total / count.clamp(min=1)
    sq = torch.zeros_like(count).index_add(0, index, w * (r - mean[index]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(count))
    return mean[index], std[index], count[index]


def _group_std(rewards, valid, group_ids):
    return group_stats(rewards, valid, group_ids)[1]


def _batch_std(rewards, valid, group_ids):
    n = valid.sum()
    if n < 2:
        return torch.zeros_like(rewards)
    r = rewards[valid]
    return ((r - r.mean()).pow(2).sum() / (n - 1)).sqrt().expand_as(rewards)


REWARD_SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None] = {
    "group": _group_std,
    "batch": _batch_std,
    "none": None,
}
"""``scale_rewards`` -> the std an advantage is divided by (None: not divided, Dr. GRPO)."""


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor,
                     scale_rewards: ScaleRewards = "group", eps: float = STD_EPS) -> torch.Tensor:
    """Group-relative advantages over a whole rollout batch; invalid samples get 0.

    Args:
        rewards: [N] rewards (any value where invalid).
        valid: [N] bool.
        group_ids: [N] the prompt group of each sample (any integers; groups need not be sorted).
        scale_rewards: ``group``, ``batch`` or ``none`` (see :data:`REWARD_SCALES`).
    """
    if scale_rewards not in REWARD_SCALES:
        raise UserError(f"unknown scale_rewards '{scale_rewards}': use one of {', '.join(REWARD_SCALES)}")
    rewards = rewards.float()
    mean, _, count = group_stats(rewards, valid, group_ids)
    adv = rewards - mean
    scale = REWARD_SCALES[scale_rewards]
    if scale is not None:
        adv = adv / (scale(rewards, valid, group_ids) + eps)
    keep = valid & (count > 1)
    return torch.where(keep, adv, torch.zeros_like(adv))


def zero_std_fraction(rewards: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Share of groups (with any valid sample) whose valid rewards are all equal: no signal there."""
    index, num_groups = _dense(group_ids)
    _, std, count = group_stats(rewards.float(), valid, group_ids)
    per_group_std, per_group_n = torch.zeros(num_groups), torch.zeros(num_groups)
    per_group_std[index.cpu()] = std.cpu()  # the same value for every member of a group
    per_group_n[index.cpu()] = count.cpu()
    live = per_group_n > 0
    return float((per_group_std[live] == 0).float().mean()) if live.any() else 0.0


# -- the per-token objective -------------------------------------------------------------------
def old_logprobs_for(iteration: int, score_pass_logp: torch.Tensor | None) -> torch.Tensor | None:
    """Old log-probs for pass ``iteration`` (0-based) over a rollout batch: None (ratio exactly 1)
    on the first pass, the score pass's log-probs on later ones."""
    if iteration == 0:
        return None
    if score_pass_logp is None:
        raise ValueError("num_iterations > 1 needs the score pass's log-probs")
    return score_pass_logp


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor | None) -> torch.Tensor:
    """``exp(logp - old_logp)``; with ``old_logp=None`` it is 1 in value with the gradient of ``logp``."""
    old = logp.detach() if old_logp is None else old_logp
    return torch.exp(logp - old)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)`` and the ratio.

    ``logp``/``old_logp`` are [B, T]; ``advantages`` is [B] (one per reply) or [B, T].
    """
    ratio = importance_ratio(logp, old_logp)
    adv = advantages.detach().to(ratio.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return -torch.min(ratio * adv, clipped * adv), ratio


@dataclass
class TokenLoss:
    """Per-token terms of one micro-batch (all [B, T]; meaningless where the weight is 0)."""

    loss: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor | None
    weight: torch.Tensor
    """1 on response tokens of valid replies, 0 elsewhere."""
    clipped: torch.Tensor
    """1 where the clip bound is active (low with A < 0, high with A > 0)."""


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor, response_mask: torch.Tensor, valid: torch.Tensor,
                    eps_low: float = 0.2, eps_high: float | None = None, beta: float = 0.0) -> TokenLoss:
    """The clipped objective plus ``beta`` x k3 KL per token, with the weights of valid replies.

    Args:
        logp: [B, T] log-probs of the sampled tokens under the policy being trained.
        old_logp: [B, T] the same at sampling time (None: ratio 1, see :func:`old_logprobs_for`).
        ref_logp: [B, T] under the frozen reference (needed when ``beta > 0``).
        advantages: [B] from :func:`group_advantages`.
        response_mask: [B, T] 1 on response tokens.
        valid: [B] bool; invalid replies get no weight at all.
        eps_high: Upper clip (DAPO's eps_high); None means ``eps_low``.
    """
    eps_high = eps_low if eps_high is None else eps_high
    surrogate, ratio = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        surrogate = surrogate + beta * kl
    weight = response_mask.to(surrogate.dtype) * valid.to(surrogate.dtype)[:, None]
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    clipped = (((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))).to(surrogate.dtype)
    return TokenLoss(surrogate, ratio.detach(), None if kl is None else kl.detach(), weight, clipped.detach())


# -- aggregation over tokens and replies -------------------------------------------------------
@dataclass(frozen=True)
class UpdateTotals:
    """The normalisers' counts of one optimizer step, summed over every rank."""

    num_replies: int
    """Valid replies of the optimizer step (every micro-batch of the step, every rank)."""
    generation_tokens: int
    """Response tokens of valid replies of the whole generation (rollout) batch, every rank:
    ``dapo``'s normaliser (TRL's ``num_items_in_batch``)."""
    num_micro_batches: int
    """Micro-batches of the step on this rank (``bnpo``)."""
    max_completion_length: int
    """Dr. GRPO's constant (the generation limit, ``max_new_tokens``)."""
    world_size: int = 1
    """Ranks whose gradients are averaged: a rank's share of a loss summed over ranks is multiplied by it."""


def valid_token_count(response_mask: torch.Tensor, valid: torch.Tensor) -> int:
    """Response tokens of the valid replies of a [B, T] mask."""
    return int((response_mask * valid.to(response_mask.device, response_mask.dtype)[:, None]).sum())


def update_totals(response_masks: Sequence[torch.Tensor], valids: Sequence[torch.Tensor],
                  max_completion_length: int, reduce: Reduce = no_reduce,
                  generation_tokens: int | None = None) -> UpdateTotals:
    """:class:`UpdateTotals` from each micro-batch's [B, T] response mask and [B] valid flags of one step.

    Args:
        reduce: Sums a tensor over ranks (the identity on one process); the world size is its sum of ones.
        generation_tokens: Valid response tokens of the whole generation batch over all ranks; None:
            the step is the whole generation batch (its tokens, summed by ``reduce``).
    """
    replies = sum(int(v.sum()) for v in valids)
    tokens = sum(valid_token_count(m, v) for m, v in zip(response_masks, valids))
    counts = torch.tensor([1.0, replies, tokens], dtype=torch.float64, device=response_masks[0].device)
    world, replies, tokens = (round(x) for x in reduce(counts).tolist())
    return UpdateTotals(replies, tokens if generation_tokens is None else generation_tokens, len(response_masks),
                        max_completion_length, world)


def _grpo(loss: torch.Tensor, weight: torch.Tensor, totals: UpdateTotals) -> torch.Tensor:
    per_reply = (loss * weight).sum(-1) / weight.sum(-1).clamp(min=1)
    return per_reply.sum() * totals.world_size / max(totals.num_replies, 1)


def _bnpo(loss: torch.Tensor, weight: torch.Tensor, totals: UpdateTotals) -> torch.Tensor:
    return (loss * weight).sum() / weight.sum().clamp(min=1) / max(totals.num_micro_batches, 1)


def _dr_grpo(loss: torch.Tensor, weight: torch.Tensor, totals: UpdateTotals) -> torch.Tensor:
    return (loss * weight).sum() * totals.world_size / max(totals.num_replies * totals.max_completion_length, 1)


def _dapo(loss: torch.Tensor, weight: torch.Tensor, totals: UpdateTotals) -> torch.Tensor:
    return (loss * weight).sum() * totals.world_size / max(totals.generation_tokens, 1)


LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, UpdateTotals], torch.Tensor]] = {
    "grpo": _grpo,
    "bnpo": _bnpo,
    "dr_grpo": _dr_grpo,
    "dapo": _dapo,
}
"""``loss_type`` -> ``f(per_token_loss [B, T], weight [B, T], totals) -> scalar``: one micro-batch's
share of the step's loss on its rank, times the world size (the shares of a step sum, and their
mean over ranks is the step's loss)."""


def loss_aggregation(loss_type: LossType) -> Callable[[torch.Tensor, torch.Tensor, UpdateTotals], torch.Tensor]:
    """The aggregation for ``loss_type``, chosen once (e.g. in a module's ``__init__``)."""
    if loss_type not in LOSS_AGGREGATIONS:
        raise UserError(f"unknown loss_type '{loss_type}': use one of {', '.join(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[loss_type]
