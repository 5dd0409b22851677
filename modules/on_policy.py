"""The on-policy cycle every method shares, as a LightningModule with manual optimization.

One ``training_step`` receives the prompts of one rollout batch (``batch_size * grad_accum``) and
runs:

    collect:  for each micro-batch of ``batch_size`` prompts
                  rollout  (sample with the *current* parameters; the seed is a pure function of
                            the run seed, the rollout-batch index, the micro-batch and the rank)
                  reward   (submitted at once; remote judges work while the next one generates)
    update:   for each micro-batch
                  advantage and loss   (``micro_batch_loss``, the method's math)
                  manual_backward(loss / number of micro-batches)
              clip the gradient norm, one optimizer step

so one Lightning step is one optimizer update and ``trainer.global_step`` counts updates. Methods
that take several optimizer steps per rollout batch (PPO epochs over minibatches) override
``update``; ``global_step`` then counts each ``opt.step()``, and prompts are scheduled by
``rollout_batches_done``, not by ``global_step``.

An update whose loss or gradient norm is NaN/inf is skipped (no optimizer step, a warning, the
``skipped_updates`` metric); ``max_skipped_updates`` in a row stop the run.

What a checkpoint holds: only the trainable state (the frozen base model is rebuilt from its id),
the optimizer, the loop counters, the running reward EMA and the RNG states, so that ``fit
--ckpt_path last`` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import logging
import math
import time
from abc import abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import lightning as L
import torch
from tqdm.auto import tqdm

from modules.errors import UserError

from modules.judges.rewards import PendingRewards, Rewards
from modules.rl.advantages import ema_update, masked_mean, masked_std
from modules.rollout import Rollout, SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class PromptBatch:
    """Prompts of one rollout batch, chat template applied and left-padded."""

    index: int
    """Position of this rollout batch in the prompt schedule (seeds the rollouts)."""
    prompts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def split(self, size: int) -> list["PromptBatch"]:
        parts = []
        for start in range(0, len(self.prompts), size):
            ids, mask = self.input_ids[start : start + size], self.attention_mask[start : start + size]
            keep = int(mask.sum(0).nonzero()[0]) if mask.any() else 0  # drop all-padding columns
            parts.append(PromptBatch(self.index, self.prompts[start : start + size], ids[:, keep:], mask[:, keep:]))
        return parts

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.index, self.prompts, self.input_ids.to(device), self.attention_mask.to(device))


@dataclass
class Experience:
    """A micro-batch's rollout and its rewards, ready for the loss."""

    rollout: Rollout
    rewards: Rewards


class OnPolicyModule(L.LightningModule):
    """Base of every method: the rollout → reward → advantage → loss → step cycle.

    Args:
        batch_size: Prompts per micro-batch (one generate call, one backward).
        grad_accum: Micro-batches per optimizer update (effective batch = batch_size * grad_accum).
        total_updates: Optimizer updates to run (sets ``trainer.max_steps`` through the CLI).
        max_new_tokens: Most tokens sampled per response.
        temperature: Sampling temperature (log-probs in the loss use the same temperature).
        top_p: Nucleus sampling threshold (1.0 samples from the full distribution, exactly on-policy).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_grad_norm: Clip the gradient norm to this before each step (0 disables clipping).
        seed: Seeds the rollout sampling (with the rollout-batch index, micro-batch and rank).
        reward_ema_decay: Decay of the logged reward EMA.
        max_skipped_updates: Give up after this many consecutive updates skipped for a NaN/inf loss.
    """

    trainable_prefixes: tuple[str, ...] = ()
    """State-dict prefixes of the trainable state; only these are saved in checkpoints."""

    def __init__(
        self,
        batch_size: int = 8,
        grad_accum: int = 1,
        total_updates: int = 30,
        max_new_tokens: int = 120,
        temperature: float = 1.0,
        top_p: float = 1.0,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        seed: int = 0,
        reward_ema_decay: float = 0.9,
        max_skipped_updates: int = 10,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable state only
        if batch_size < 1 or grad_accum < 1 or total_updates < 1:
            raise UserError("batch_size, grad_accum and total_updates must be at least 1")
        self.batch_size, self.grad_accum, self.total_updates = batch_size, grad_accum, total_updates
        self.lr, self.weight_decay, self.max_grad_norm = lr, weight_decay, max_grad_norm
        self.seed, self.reward_ema_decay, self.max_skipped_updates = seed, reward_ema_decay, max_skipped_updates
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_p)
        self.rollout_batches_done = 0
        self.reward_ema: float | None = None
        self._skipped_in_a_row = 0
        self.skipped_updates = 0
        self.last_experiences: list[Experience] = []
        self.batch_judge_calls = False  # set by the JudgeBatching callback

    # -- what a method provides ----------------------------------------------------------------
    @abstractmethod
    def rollout_micro_batch(self, prompts: PromptBatch, seed: int) -> Rollout:
        """Sample responses with the current parameters."""

    @abstractmethod
    def submit_rewards(self, rollout: Rollout) -> PendingRewards:
        """Start scoring a rollout; must not block."""

    @abstractmethod
    def micro_batch_loss(self, experience: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Advantages and loss of one micro-batch, plus per-micro-batch metrics (scalars)."""

    def preflight(self) -> None:
        """Check, before anything is written, that external parts (judges) answer; raise UserError."""

    def extra_metrics(self) -> dict[str, float]:
        """Method-specific metrics logged once per update (e.g. alpha and ||v||)."""
        return {}

    def reward_hold(self) -> AbstractContextManager:
        """Context inside which reward submissions of one update are batched (see JudgeBatching)."""
        return nullcontext()

    # -- the cycle -----------------------------------------------------------------------------
    def rollout_seed(self, batch_index: int, micro_index: int) -> int:
        return (self.seed * 1_000_003 + batch_index * 9_973 + micro_index * 101 + self.global_rank) % (2**31 - 1)

    def collect(self, batch: PromptBatch) -> list[Experience]:
        """Rollouts of every micro-batch, each reward submitted as soon as its rollout exists."""
        pending: list[tuple[Rollout, PendingRewards]] = []
        parts = batch.split(self.batch_size)
        show = len(parts) > 1 and self._trainer is not None and self.trainer.is_global_zero
        for k, micro in enumerate(tqdm(parts, desc=f"rollouts of update {batch.index + 1}", leave=False,
                                       disable=not show)):
            rollout = self.rollout_micro_batch(micro, self.rollout_seed(batch.index, k))
            pending.append((rollout, self.submit_rewards(rollout)))
        start = time.perf_counter()
        experiences = [Experience(rollout, rewards.result()) for rollout, rewards in pending]
        self._timings["judge_wait_s"] = time.perf_counter() - start
        return experiences

    def update(self, experiences: list[Experience]) -> dict[str, float]:
        """One optimizer step over all micro-batches (gradient accumulation); skip it on NaN/inf."""
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        per_micro: list[dict[str, torch.Tensor]] = []
        finite = True
        for exp in experiences:
            loss, metrics = self.micro_batch_loss(exp)
            per_micro.append({"loss": loss.detach(), **metrics})
            if not torch.isfinite(loss):
                finite = False
                break
            self.manual_backward(loss / len(experiences))
        grad_norm = torch.tensor(0.0)
        if finite:
            params = [p for g in opt.optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
            finite = bool(torch.isfinite(grad_norm))
        if finite:
            opt.step()
            self._skipped_in_a_row = 0
        else:
            opt.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            self._skipped_in_a_row += 1
            log.warning("skipped update %d: the loss or gradient was NaN/inf", self.rollout_batches_done)
            if self._skipped_in_a_row >= self.max_skipped_updates:
                raise RuntimeError(f"{self._skipped_in_a_row} updates in a row had a NaN/inf loss: stopping")
        metrics = {k: float(torch.stack([m[k].float() for m in per_micro]).mean()) for k in per_micro[0]}
        metrics["grad_norm"] = float(grad_norm)
        metrics["skipped_updates"] = float(self.skipped_updates)
        return metrics

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._timings: dict[str, float] = {}
        start = time.perf_counter()
        with self.reward_hold():
            experiences = self.collect(batch)
        metrics = self.update(experiences)
        self.last_experiences = experiences  # for callbacks (e.g. reward-model features), until the next step
        self.rollout_batches_done += 1
        metrics.update(self._rollout_metrics(experiences))
        metrics.update(self.extra_metrics())
        metrics.update({f"time/{k}": v for k, v in self._timings.items()})
        metrics["time/update_s"] = time.perf_counter() - start
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, sync_dist=True)
        self.log_dict(
            {"reward": metrics["reward/mean"], "kl": metrics.get("kl/token", 0.0), "len": metrics["response/length"]},
            on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1,
        )

    def _rollout_metrics(self, experiences: list[Experience]) -> dict[str, float]:
        rewards = torch.cat([e.rewards.values for e in experiences])
        valid = torch.cat([e.rewards.valid for e in experiences])
        lengths = torch.cat([e.rollout.lengths.float().cpu() for e in experiences])
        tokens = sum(e.rollout.num_tokens for e in experiences)
        gen_seconds = sum(e.rollout.seconds for e in experiences)
        mean = float(masked_mean(rewards, valid)) if valid.any() else float("nan")
        if valid.any():
            self.reward_ema = ema_update(self.reward_ema, mean, self.reward_ema_decay)
        self._timings["generate_s"] = gen_seconds
        metrics = {
            "reward/mean": mean,
            "reward/std": float(masked_std(rewards, valid)),
            "reward/ema": self.reward_ema if self.reward_ema is not None else float("nan"),
            "response/length": float(lengths.mean()),
            "rollout/tokens_per_s": tokens / max(gen_seconds, 1e-9),
            "judge/failed": float((~valid).sum()),
        }
        for name in experiences[0].rewards.extras:
            values = torch.cat([e.rewards.extras[name] for e in experiences])
            metrics[f"reward/{name}"] = float(masked_mean(values, valid))
        return metrics

    # -- optimizer and checkpoints -------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if any(p.dtype != torch.float32 for p in params):
            raise UserError("trainable parameters must be fp32 master copies")
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k.startswith(self.trainable_prefixes)}
        checkpoint["on_policy"] = {
            "rollout_batches_done": self.rollout_batches_done,
            "reward_ema": self.reward_ema,
            "skipped_updates": self.skipped_updates,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = {k for k in self.state_dict() if k.startswith(self.trainable_prefixes)}
        missing = expected - set(checkpoint["state_dict"])
        if missing:
            raise UserError(f"checkpoint lacks trainable state {sorted(missing)}: was it written by this method?")
        state = checkpoint.get("on_policy", {})
        self.rollout_batches_done = state.get("rollout_batches_done", 0)
        self.reward_ema = state.get("reward_ema")
        self.skipped_updates = state.get("skipped_updates", 0)
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
