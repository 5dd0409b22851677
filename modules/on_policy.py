"""The on-policy cycle every method shares, as a LightningModule with manual optimization.

One ``training_step`` receives the prompts of one rollout batch and runs four stages:

    collect     for each micro-batch of ``batch_size`` rows (``samples_per_prompt`` rows per
                prompt, a group never split): sample with the *current* parameters (the seed is a
                pure function of the run seed, the rollout-batch index, the micro-batch and the
                rank) and submit its rewards at once (remote judges work while the next one
                generates)
    score       one no-grad pass per micro-batch: whatever the method's update needs (old and
                reference log-probs, values, reference hidden states)
    advantages  over the whole rollout batch at once (reduced across ranks; group-aware)
    update      one or many optimizer steps (PPO epochs x minibatches), each through
                :meth:`OnPolicyModule.optimizer_step_on`

"An update" for the user is one rollout batch: ``total_updates`` counts them, training stops
after them, and checkpoints, progress, held-out evaluations and resume count
``rollout_batches_done``. ``trainer.global_step`` counts every ``opt.step()``.

No step without a signal: an update whose rollout batch has no valid reward (a judge that stopped
answering) takes no optimizer step and is counted; ``max_updates_without_signal`` of them in a row
stop the run with one line that names the reward. An optimizer step whose loss or gradient is
NaN/inf is skipped on every rank together and counted; ``max_skipped_updates`` in a row stop the
run.

Under several ranks, logged metrics are averaged over ranks, except counts of events (judge
requests, failures, retries, cache hits, parse failures), which are summed, and peak memory, of
which the largest rank's is logged (:func:`reduction_over_ranks`). A remote judge's
``max_concurrency`` is the budget of all ranks together: each keeps its share.

What a checkpoint holds: only what requires grad (a steering vector, LoRA weights, a value head)
plus any module listed in ``extra_state_modules`` (e.g. a discriminator's buffers), the optimizer
and scheduler, the loop counters and the RNG states, so that ``fit --ckpt_path last`` continues
exactly where an uninterrupted run would be. The frozen base model is rebuilt from its id.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import torch
from tqdm.auto import tqdm

from modules.errors import UserError
from modules.experience import Experience, LRSchedule, PromptBatch, lr_factor  # noqa: F401  (re-exported)
from modules.judges.base import share_endpoints_among
from modules.rewards import PendingRewards, RewardFunction
from modules.rl.advantages import ema_update, masked_mean, masked_std
from modules.rl.kl import exact_kl
from modules.rl.losses import TokenStats, response_token_stats
from modules.rollout import Rollout, SamplingConfig, response_hidden_states
from modules.sharding import check_strategy, deepspeed_engine, gathered, shard_for_fsdp2, total_norm, whole

log = logging.getLogger(__name__)

EVENT_COUNTS = ("judge/requests", "judge/cache_hits", "judge/failed", "judge/failed_requests", "judge/retries",
                "parse_failures")


def counts_events(name: str) -> bool:
    """Whether a metric counts events on its rank (summed over ranks) rather than measuring a mean."""
    return name.endswith(EVENT_COUNTS) or "parse_failure/" in name


def reduction_over_ranks(name: str) -> str:
    """How a logged metric combines over ranks: ``sum`` (counts), ``max`` (peak memory) or ``mean``."""
    return "sum" if counts_events(name) else "max" if name.startswith("memory/") else "mean"

class TrainingStopped(UserError):
    """Training cannot make progress (no reward signal, NaN losses); checkpoints so far are intact."""


class OnPolicyModule(L.LightningModule):
    """Base of every method: the collect → score → advantages → update cycle.

    Args:
        batch_size: Rows per micro-batch (one generate call, one forward/backward chunk).
        grad_accum: Micro-batches per rollout batch (rows per update = batch_size * grad_accum).
        samples_per_prompt: Replies sampled per prompt (a group); must divide batch_size.
        total_updates: Rollout batches (updates) to train for; training stops after them.
        max_new_tokens: Most tokens sampled per response.
        temperature: Sampling temperature (log-probs in the loss use the same temperature).
        top_p: Nucleus sampling threshold (1.0 samples from the full distribution, exactly on-policy).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_grad_norm: Clip the gradient norm to this before each step (0 disables clipping).
        lr_schedule: ``constant``, ``linear`` (to 0 at the last update) or ``cosine``.
        warmup_updates: Updates of linear learning-rate warm-up before the schedule.
        seed: Seeds the rollout sampling (with the rollout-batch index, micro-batch and rank).
        reward_ema_decay: Decay of the logged reward EMA.
        max_skipped_updates: Stop after this many optimizer steps in a row skipped for a NaN/inf loss.
        max_updates_without_signal: Stop after this many updates in a row with no valid reward.
        update_batch_size: Rows per forward/backward chunk of the update (default: batch_size);
            smaller chunks bound activation memory without changing the step.
        gradient_checkpointing: Recompute the policy's decoder layers in the backward pass instead of
            storing their activations (less memory, about a third more compute per loss pass).
    """

    extra_state_modules: tuple[str, ...] = ()
    """Names of submodules whose whole state (buffers too) is checkpointed beside what requires grad."""

    def __init__(
        self,
        batch_size: int = 8,
        grad_accum: int = 1,
        samples_per_prompt: int = 1,
        total_updates: int = 30,
        max_new_tokens: int = 120,
        temperature: float = 1.0,
        top_p: float = 1.0,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        lr_schedule: LRSchedule = "constant",
        warmup_updates: int = 0,
        seed: int = 0,
        reward_ema_decay: float = 0.9,
        max_skipped_updates: int = 10,
        max_updates_without_signal: int = 3,
        update_batch_size: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable state only
        for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum),
                            ("samples_per_prompt", samples_per_prompt), ("total_updates", total_updates),
                            ("max_new_tokens", max_new_tokens), ("max_skipped_updates", max_skipped_updates),
                            ("max_updates_without_signal", max_updates_without_signal),
                            ("update_batch_size", update_batch_size or batch_size)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if batch_size % samples_per_prompt:
            raise UserError(f"samples_per_prompt ({samples_per_prompt}) must divide batch_size ({batch_size}): "
                            "a group of replies to one prompt is never split across micro-batches")
        if not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature} (sampling needs a positive temperature)")
        if not 0 < top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {top_p}")
        if not lr > 0:
            raise UserError(f"lr must be > 0, got {lr}")
        for name, value in (("weight_decay", weight_decay), ("max_grad_norm", max_grad_norm),
                            ("warmup_updates", warmup_updates)):
            if value < 0:
                raise UserError(f"{name} must be >= 0, got {value}")
        if lr_schedule not in ("constant", "linear", "cosine"):
            raise UserError(f"unknown lr_schedule '{lr_schedule}': use constant, linear or cosine")
        if not 0 <= reward_ema_decay < 1:
            raise UserError(f"reward_ema_decay must be in [0, 1), got {reward_ema_decay}")
        self.batch_size, self.grad_accum, self.total_updates = batch_size, grad_accum, total_updates
        self.samples_per_prompt = samples_per_prompt
        self.update_batch_size, self.gradient_checkpointing = update_batch_size or batch_size, gradient_checkpointing
        self.lr, self.weight_decay, self.max_grad_norm = lr, weight_decay, max_grad_norm
        self.lr_schedule, self.warmup_updates = lr_schedule, warmup_updates
        self.seed, self.reward_ema_decay = seed, reward_ema_decay
        self.max_skipped_updates, self.max_updates_without_signal = max_skipped_updates, max_updates_without_signal
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_p)
        self.rollout_batches_done = 0
        self.reward_ema: float | None = None
        self.skipped_updates = 0  # optimizer steps skipped for NaN/inf
        self._skipped_in_a_row = 0
        self.updates_without_signal = 0
        self._without_signal_in_a_row = 0
        self.last_experiences: list[Experience] = []
        self._warned_flat = False
        self.batch_judge_calls = False  # set by the JudgeBatching callback
        self._timings: dict[str, float] = {}
        self._logged_last_update: set[str] = set()

    @property
    def prompts_per_update(self) -> int:
        return self.batch_size * self.grad_accum // self.samples_per_prompt

    # -- what a method provides ----------------------------------------------------------------
    reward: RewardFunction
    """The method's reward (a judge, a reward model, a sum of them)."""
    policy: torch.nn.Module
    """The causal LM that samples (with the method's intervention or adapter inside)."""
    tokenizer: object
    logit_chunk_tokens: int = 1024
    arm_names: tuple[str, str] = ("reference", "trained")
    """Names of the reference and trained policy in held-out reports."""

    @abstractmethod
    def rollout_micro_batch(self, prompts: PromptBatch, seed: int) -> Rollout:
        """Sample responses with the current parameters (interventions on)."""

    def score(self, experience: Experience) -> None:
        """No-grad pass over a micro-batch's rollout; fills ``experience.scores``."""

    @abstractmethod
    def compute_advantages(self, batch: Experience) -> None:
        """Fill ``batch.advantages`` (and ``returns``) over the whole rollout batch."""

    @abstractmethod
    def update(self, batch: Experience) -> dict[str, float]:
        """Optimizer step(s) on the rollout batch, each through :meth:`optimizer_step_on`."""

    @abstractmethod
    def reference(self) -> AbstractContextManager:
        """The reference policy (the policy as training started: intervention off / starting adapter)."""

    def interventions_off(self) -> AbstractContextManager:
        """The bare base model (what a local judge sharing the weights sees)."""
        return self.reference()

    def preflight(self, datamodule=None) -> None:
        """Check, before anything is written, that external parts answer and data fits; raise UserError."""
        for split in ("train", "heldout"):
            records = getattr(datamodule, f"{split}_records", None) if datamodule is not None else None
            if records:
                self.reward.check_data(records, f"{split} data")
        self.reward.preflight()

    def extra_metrics(self) -> dict[str, float]:
        """Method-specific metrics logged once per update (called on every rank: a sharded tensor is
        read through :func:`modules.sharding.whole`)."""
        return {}

    def heldout_summary(self, values: dict[str, list[float]]) -> dict[str, float]:
        """One held-out arm's own figures from its per-sample reward parts and scalar features
        (default: the mean of each, e.g. a persona's score or a feature's activation)."""
        return {name: sum(v) / len(v) for name, v in sorted(values.items()) if v}

    def heldout_tables(self, values: dict[str, list[float]]) -> str:
        """Tables printed under a held-out report (none by default)."""
        return ""

    def export_artifacts(self, run_dir: Path, update: int, final: bool) -> None:
        """Portable files beside a checkpoint (a steering vector, a PEFT adapter)."""

    def minibatch_passes(self, batch: Experience, passes: int, num_minibatches: int,
                         step: Callable[[int, list[Experience]], dict[str, float]],
                         stop_after: Callable[[list[dict[str, float]]], bool] | None = None) -> list[dict[str, float]]:
        """``passes`` passes over the rollout batch's rows, each shuffled (seeded by the run seed and
        the update, so a resumed run shuffles alike) into ``num_minibatches`` equal minibatches;
        ``step(pass_index, chunks)`` makes one optimizer step on a minibatch's chunks. After each
        pass ``stop_after(that pass's step metrics)`` may end the update early (PPO's target KL)."""
        rows = len(batch.rollout.prompts)
        size = rows // num_minibatches
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rollout_batches_done)
        steps: list[dict[str, float]] = []
        for index in range(passes):
            order = torch.randperm(rows, generator=generator)
            this_pass = [step(index, self.chunks(batch, order[start : start + size])) for start in range(0, rows, size)]
            steps.extend(this_pass)
            if stop_after is not None and stop_after(this_pass):
                break
        return steps

    def chunks(self, batch: Experience, rows: torch.Tensor) -> list[Experience]:
        """``rows`` of ``batch`` in chunks of ``update_batch_size`` (one forward/backward each)."""
        size = self.update_batch_size
        return [batch.select(rows[i : i + size]) for i in range(0, len(rows), size)]

    @contextmanager
    def loss_pass(self) -> Iterator[None]:
        """Around a forward whose gradient is taken: train mode where gradient checkpointing (which
        transformers applies in train mode only) or the method's dropout wants it; eval otherwise,
        so sampling and scoring never see dropout."""
        train = self.gradient_checkpointing or self.dropout_in_loss
        if train:
            self.policy.train()
        try:
            yield
        finally:
            if train:
                self.policy.eval()

    dropout_in_loss: bool = False
    """Whether the loss forward runs with the policy's dropout (e.g. LoRA dropout)."""

    def configure_model(self) -> None:
        """Under ``--trainer.strategy fsdp``: shard the policy's layers and the trainable modules
        (:func:`modules.sharding.shard_for_fsdp2`); nothing under other strategies."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            shard_for_fsdp2(self, self.policy, mesh["data_parallel"])

    def whole_weights(self) -> AbstractContextManager:
        """Sharded weights gathered whole for the context (generation, judging, exports); a no-op
        unless the strategy shards them. Every rank must enter it together."""
        return gathered(self)

    def on_fit_start(self) -> None:
        check_strategy(self.trainer.strategy, self)
        share_endpoints_among(self.trainer.world_size)  # a remote judge's max_concurrency is for all ranks
        self.policy.eval()  # no dropout while sampling and scoring; see loss_pass
        if self.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def teardown(self, stage: str) -> None:
        share_endpoints_among(1)  # judges used after training (evaluate, generate) are this process's alone

    def policy_hidden(self, batch: Rollout) -> torch.Tensor:
        """[B, R, d] final hidden states predicting the response tokens, interventions on (gradient
        as the caller's context); under ``reference()`` the reference policy's."""
        return response_hidden_states(self.policy, batch)

    # -- per-token statistics ------------------------------------------------------------------
    def token_stats(self, hidden: torch.Tensor, ref_hidden: torch.Tensor | None, batch: Rollout,
                    full_kl=None, entropy: bool = False) -> TokenStats:
        """Log-probs (and a full-vocabulary KL when ``ref_hidden`` and ``full_kl`` are given) of a
        rollout's response tokens from [N, d] hidden states gathered under the response mask."""
        targets = batch.response_ids[batch.response_mask.bool()]
        weight = whole(self.policy.get_output_embeddings().weight)  # a frozen copy under ZeRO-3
        return response_token_stats(hidden, ref_hidden, targets, weight, self.sampling.temperature,
                                    full_kl if ref_hidden is not None else None, self.logit_chunk_tokens, entropy)

    @torch.no_grad()
    def heldout_kl(self, batch: Rollout) -> torch.Tensor:
        """[N] exact KL(policy || reference) at each response token (held-out reports)."""
        mask = batch.response_mask.bool()
        with self.reference():
            ref_hidden = self.policy_hidden(batch)[mask]
        return self.token_stats(self.policy_hidden(batch)[mask], ref_hidden, batch, exact_kl).kl

    # -- the cycle -----------------------------------------------------------------------------
    def rollout_seed(self, batch_index: int, micro_index: int) -> int:
        return (self.seed * 1_000_003 + batch_index * 9_973 + micro_index * 101 + self.global_rank) % (2**31 - 1)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (the identity on one device)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="sum")

    def reward_hold(self) -> AbstractContextManager:
        return self.reward.hold() if self.batch_judge_calls else nullcontext()

    def collect(self, batch: PromptBatch) -> list[Experience]:
        """Rollouts of every micro-batch, each reward submitted as soon as its rollout exists."""
        pending: list[tuple[Rollout, PendingRewards, torch.Tensor]] = []
        rows = batch.repeat(self.samples_per_prompt)
        groups = torch.arange(len(batch.prompts)).repeat_interleave(self.samples_per_prompt)
        parts = rows.split(self.batch_size)
        show = len(parts) > 1 and self._trainer is not None and self.trainer.is_global_zero
        submit_s = 0.0
        for k, micro in enumerate(tqdm(parts, desc=f"rollouts of update {batch.index + 1}", leave=False,
                                       disable=not show)):
            rollout = self.rollout_micro_batch(micro, self.rollout_seed(batch.index, k))
            rollout.records = rollout.records or list(micro.records)
            group = groups[k * self.batch_size : k * self.batch_size + len(micro.prompts)]
            started = time.perf_counter()
            pending.append((rollout, self.reward.submit(rollout), group))
            submit_s += time.perf_counter() - started
        self._timings["reward_submit_s"] = submit_s  # rewards computed in submit (e.g. a reward model)
        start = time.perf_counter()
        experiences = [Experience(r, p.result(), g) for r, p, g in pending]
        self._timings["judge_wait_s"] = time.perf_counter() - start
        return experiences

    def on_train_batch_start(self, batch: PromptBatch, batch_idx: int) -> int | None:
        """A run resumed from its final checkpoint trains no further (its end-of-training hooks,
        such as the held-out report, still run)."""
        if self.rollout_batches_done >= self.total_updates:
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._timings = {}
        start = time.perf_counter()
        with self.whole_weights():
            with self.reward_hold():
                experiences = self.collect(batch)
            started = time.perf_counter()
            with torch.no_grad():
                for experience in experiences:
                    self.score(experience)
            self._timings["score_s"] = time.perf_counter() - started
        merged = Experience.concat(experiences, self.tokenizer.pad_token_id)
        metrics = self._rollout_metrics(experiences)
        if self._has_signal(merged):
            self.compute_advantages(merged)
            started = time.perf_counter()
            metrics.update(self.update(merged))
            self._timings["update_s"] = time.perf_counter() - started
            self._without_signal_in_a_row = 0
        else:
            self._record_update_without_signal()
        self.last_experiences = [merged]  # for callbacks (e.g. reward-model features), until the next update
        self.rollout_batches_done += 1
        if self.lr_schedulers() is not None:
            self.lr_schedulers().step()
        metrics.update(self.extra_metrics())
        metrics.update(self.reward.metrics())
        metrics.update({f"time/{k}": v for k, v in self._timings.items()})
        metrics["time/rollout_batch_s"] = time.perf_counter() - start
        metrics["updates_without_signal"] = float(self.updates_without_signal)
        metrics["skipped_updates"] = float(self.skipped_updates)
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]
        if self.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        # what this update did not do (no optimizer step: no loss, no grad norm) is logged as NaN, never
        # as the previous update's value (Lightning keeps a step metric's last value until it is logged again)
        metrics.update({k: float("nan") for k in self._logged_last_update - metrics.keys()})
        self._logged_last_update = set(metrics)
        for reduction in ("mean", "sum", "max"):  # the same keys on every rank, in the same order
            group = {k: v for k, v in metrics.items() if reduction_over_ranks(k) == reduction}
            self.log_dict(group, on_step=True, on_epoch=False, batch_size=1, sync_dist=True, reduce_fx=reduction)
        self.log_dict(
            {"reward": metrics["reward/mean"], "kl": metrics.get("kl/token", float("nan")),
             "len": metrics["response/length"]},
            on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1,
        )
        if self.rollout_batches_done >= self.total_updates:
            self.trainer.should_stop = True

    def _has_signal(self, batch: Experience) -> bool:
        valid = self.reduce_sum(batch.valid.sum().to(self.device, torch.float32))
        return bool(valid > 0)

    def _record_update_without_signal(self) -> None:
        self.updates_without_signal += 1
        self._without_signal_in_a_row += 1
        log.warning("update %d had no valid reward (%s): no optimizer step", self.rollout_batches_done + 1,
                    self.reward.describe_failure())
        if self._without_signal_in_a_row >= self.max_updates_without_signal:
            raise TrainingStopped(
                f"{self._without_signal_in_a_row} updates in a row had no valid reward: "
                f"{self.reward.describe_failure()}. The checkpoints written so far are intact: "
                "fix the reward and resume with --ckpt_path last")

    # -- the step helper -----------------------------------------------------------------------
    def loss_weight(self, chunk: Experience) -> float:
        """How much a chunk counts in the mean over a step (default: its valid samples)."""
        return float(chunk.valid.sum())

    def optimizer_step_on(self, chunks: list[Experience],
                          loss_fn: Callable[[Experience], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                          losses_are_shares: bool = False) -> dict[str, float]:
        """One optimizer step on ``chunks`` (gradient accumulation): every method's step goes here.

        Each chunk's loss (a mean over its own samples or tokens) is weighted by its share of
        :meth:`loss_weight`, so the step follows the mean over all chunks; with
        ``losses_are_shares`` the chunk losses are already their shares of the step's loss (GRPO's
        aggregations normalise by counts summed over ranks, times the world size, so that the mean
        over ranks of a rank's summed shares is the step's loss) and are summed as they are, and the
        logged ``loss`` is that sum. Every chunk is
        backpropagated even when a loss is NaN (under DDP all ranks must run the same backward
        calls); whether to step is then decided by all ranks together. Clipping goes through
        Lightning's ``clip_gradients`` (correct under FSDP); under DeepSpeed the engine clips and
        skips (see :func:`modules.sharding.deepspeed_engine`).
        """
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        weights = [self.loss_weight(c) for c in chunks]
        total = sum(weights) or 1.0
        per_chunk: list[dict[str, torch.Tensor]] = []
        finite = True
        for chunk, weight in zip(chunks, weights):
            loss, metrics = loss_fn(chunk)
            per_chunk.append({"loss": loss.detach(), **metrics})
            finite = finite and bool(torch.isfinite(loss.detach()))
            self.manual_backward(loss if losses_are_shares else loss * (weight / total))
        engine = deepspeed_engine(self.trainer.strategy)
        if engine is not None:
            # DeepSpeed holds the gradients, clips them and skips a step whose gradient norm is NaN/inf
            # (a NaN loss gives one); the step must run for it to reset its gradient partitions
            opt.step()
            grad_norm = torch.tensor(float(engine.get_global_grad_norm() or 0.0))
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True) and engine.was_step_applied()
        else:
            grads = [p.grad for g in opt.optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = total_norm(grads)
            finite = self.trainer.strategy.reduce_boolean_decision(finite and bool(torch.isfinite(grad_norm)),
                                                                   all=True)
            if finite:
                if self.max_grad_norm > 0:
                    self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
        if finite:
            self._skipped_in_a_row = 0
        else:
            self.skipped_updates += 1
            self._skipped_in_a_row += 1
            log.warning("skipped an optimizer step of update %d: the loss or gradient was NaN/inf",
                        self.rollout_batches_done + 1)
            if self._skipped_in_a_row >= self.max_skipped_updates:
                raise TrainingStopped(f"{self._skipped_in_a_row} optimizer steps in a row had a NaN/inf loss or "
                                      "gradient: lower lr, check the reward for NaN, and resume with --ckpt_path last")
        opt.zero_grad(set_to_none=True)
        out = {k: _weighted_mean([m[k] for m in per_chunk], weights) for k in per_chunk[0]}
        if losses_are_shares:
            out["loss"] = float(sum(float(m["loss"]) for m in per_chunk))
        out["grad_norm"] = float(grad_norm)
        return out

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
        self._warn_if_rewards_are_flat(rewards, valid)
        for name in experiences[0].rewards.parts:
            values = torch.cat([e.rewards.parts[name] for e in experiences])
            metrics[f"reward/{name}"] = float(masked_mean(values, valid)) if valid.any() else float("nan")
        return metrics

    def _warn_if_rewards_are_flat(self, rewards: torch.Tensor, valid: torch.Tensor) -> None:
        """Once per run: every valid reward of a rollout batch equal means there is nothing to learn from."""
        if self._warned_flat or int(valid.sum()) < 2:
            return
        values = rewards[valid]
        if bool((values == values[0]).all()):
            self._warned_flat = True
            log.warning("every reward of update %d is %.4g: advantages are 0 and the policy learns nothing from "
                        "them. Check the reward (a rating judge whose digits get negligible probability, or a "
                        "judge that ignores the reply, gives one value to everything)",
                        self.rollout_batches_done + 1, float(values[0]))

    # -- optimizer and checkpoints -------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if any(p.dtype != torch.float32 for p in params):
            raise UserError("trainable parameters must be fp32 master copies")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant" and self.warmup_updates == 0:
            return optimizer
        total, warmup, schedule = self.total_updates, self.warmup_updates, self.lr_schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, total, warmup, schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def checkpointed_keys(self) -> set[str]:
        """State-dict keys a checkpoint keeps: parameters that require grad + ``extra_state_modules``."""
        keys = {name for name, p in self.named_parameters() if p.requires_grad}
        prefixes = tuple(f"{m}." for m in self.extra_state_modules)
        return keys | {k for k in self.state_dict() if prefixes and k.startswith(prefixes)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.checkpointed_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["on_policy"] = {
            "method": type(self).__name__,
            "rollout_batches_done": self.rollout_batches_done,
            "reward_ema": self.reward_ema,
            "skipped_updates": self.skipped_updates,
            "updates_without_signal": self.updates_without_signal,
            "reward_state": self.reward.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self.checkpointed_keys() - set(checkpoint["state_dict"])  # names only, under sharded strategies
        if missing:
            raise UserError(f"the checkpoint lacks trainable state {sorted(missing)[:5]}: "
                            "was it written by this method with the same options?")
        state = checkpoint.get("on_policy", {})
        self.rollout_batches_done = state.get("rollout_batches_done", 0)
        self.reward_ema = state.get("reward_ema")
        self.skipped_updates = state.get("skipped_updates", 0)
        self.updates_without_signal = state.get("updates_without_signal", 0)
        if state.get("reward_state"):
            self.reward.load_state_dict(state["reward_state"])
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def _weighted_mean(values: list[torch.Tensor], weights: list[float]) -> float:
    total = sum(weights)
    if total <= 0:
        return float(torch.stack([v.float() for v in values]).mean())
    return float(sum(float(v) * w for v, w in zip(values, weights)) / total)
