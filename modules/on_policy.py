"""The on-policy cycle every method shares, as a LightningModule with manual optimization.

A method sets ``policy``, ``tokenizer`` and ``reward`` and implements five hooks:

    rollout_micro_batch  sample responses to a micro-batch of prompts with the current parameters
    score                no-grad pass over a micro-batch's rollout: what the update needs (old and
                         reference log-probs, values, reference hidden states); default: nothing
    compute_advantages   advantages (and returns) over the whole rollout batch
    update               one or many optimizer steps, each through ``optimizer_step_on`` (helped by
                         ``minibatch_passes`` and ``loss_pass``)
    reference            a context in which the policy is the reference policy

One ``training_step`` takes the prompts of one rollout batch through them: ``collect`` samples
``generation_batch_size`` rows per call (a group of ``samples_per_prompt`` rows never split; the
seed a function of the run seed, the rollout batch, the call and the rank) and submits their
rewards at once (remote judges work while the next call generates); then ``score``,
``compute_advantages`` and ``update``. "An update" is one rollout batch: ``total_updates`` counts
them, and checkpoints, progress, held-out evaluations and resume count ``rollout_batches_done``;
``trainer.global_step`` counts every ``opt.step()``.

Elsewhere: the run's safety rules and what a checkpoint holds (:mod:`modules.run_guard`), what
each update logs and how it combines over ranks (:mod:`modules.update_log`), and the rest of a
method's module (held-out hooks, per-token statistics, sharding, the optimizer:
:mod:`modules.policy_module`).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from modules.experience import Experience, LRSchedule, PromptBatch
from modules.policy_module import PolicyModule
from modules.rewards import PendingRewards
from modules.rollout import Rollout, SamplingConfig
from modules.run_guard import (RunGuard, check_loop_options, checkpointed_keys, load_run_state, save_run_state,
                               step_if_finite)
from modules.update_log import UpdateLog, weighted_mean


class OnPolicyModule(PolicyModule):
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
        generation_batch_size: Rows per generate call (default: batch_size); the whole rollout batch
            in one call decodes in about the time of one micro-batch on a GPU. Seeds follow the calls.
    """

    def __init__(self, batch_size: int = 8, grad_accum: int = 1, samples_per_prompt: int = 1, total_updates: int = 30,
                 max_new_tokens: int = 120, temperature: float = 1.0, top_p: float = 1.0,
                 lr: float = 1e-2, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 lr_schedule: LRSchedule = "constant", warmup_updates: int = 0, seed: int = 0,
                 reward_ema_decay: float = 0.9, max_skipped_updates: int = 10, max_updates_without_signal: int = 3,
                 update_batch_size: int | None = None, gradient_checkpointing: bool = False,
                 generation_batch_size: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable state only
        self.batch_size, self.grad_accum, self.total_updates = batch_size, grad_accum, total_updates
        self.samples_per_prompt, self.seed = samples_per_prompt, seed
        self.update_batch_size, self.gradient_checkpointing = update_batch_size or batch_size, gradient_checkpointing
        self.generation_batch_size = generation_batch_size or batch_size
        self.lr, self.weight_decay, self.max_grad_norm = lr, weight_decay, max_grad_norm
        self.lr_schedule, self.warmup_updates = lr_schedule, warmup_updates
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_p)
        self.guard = RunGuard(max_skipped_updates, max_updates_without_signal)
        self.update_log = UpdateLog(reward_ema_decay)
        check_loop_options(self)
        self.rollout_batches_done = 0
        self.last_experiences: list[Experience] = []  # the last update's, for callbacks
        self.batch_judge_calls = False  # set by the JudgeBatching callback

    @property
    def prompts_per_update(self) -> int:
        return self.batch_size * self.grad_accum // self.samples_per_prompt

    @property
    def skipped_updates(self) -> int:
        return self.guard.skipped_updates

    @property
    def updates_without_signal(self) -> int:
        return self.guard.updates_without_signal

    # -- the hooks a method implements --------------------------------------------------------
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

    def extra_metrics(self) -> dict[str, float]:
        """Method-specific metrics logged once per update (called on every rank: a sharded tensor is
        read through :func:`modules.sharding.whole`)."""
        return {}

    def loss_weight(self, chunk: Experience) -> float:
        """How much a chunk counts in the mean over a step (default: its valid samples)."""
        return float(chunk.valid.sum())

    # -- what an update uses -------------------------------------------------------------------
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
        """Rollouts of every generate call (``generation_batch_size`` rows), each reward submitted as
        soon as its rollout exists."""
        pending: list[tuple[Rollout, PendingRewards, torch.Tensor]] = []
        rows = batch.repeat(self.samples_per_prompt)
        groups = torch.arange(len(batch.prompts)).repeat_interleave(self.samples_per_prompt)
        size = self.generation_batch_size
        parts = rows.split(size)
        show = len(parts) > 1 and self._trainer is not None and self.trainer.is_global_zero
        submit_s = 0.0
        for k, micro in enumerate(tqdm(parts, desc=f"rollouts of update {batch.index + 1}", leave=False,
                                       disable=not show)):
            rollout = self.rollout_micro_batch(micro, self.rollout_seed(batch.index, k))
            rollout.records = rollout.records or list(micro.records)
            group = groups[k * size : k * size + len(micro.prompts)]
            started = time.perf_counter()
            pending.append((rollout, self.reward.submit(rollout), group))
            submit_s += time.perf_counter() - started
        self.update_log.timings["reward_submit_s"] = submit_s  # rewards computed in submit (e.g. a reward model)
        with self.update_log.timed("judge_wait_s"):
            return [Experience(r, p.result(), g) for r, p, g in pending]

    def on_train_batch_start(self, batch: PromptBatch, batch_idx: int) -> int | None:
        """A run resumed from its final checkpoint trains no further (its end-of-training hooks,
        such as the held-out report, still run)."""
        if self.rollout_batches_done >= self.total_updates:
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.update_log.start()
        with self.whole_weights():
            with self.reward_hold():
                experiences = self.collect(batch)
            with self.update_log.timed("score_s"), torch.no_grad():
                for experience in experiences:
                    self.score(experience)
        merged = Experience.concat(experiences, self.tokenizer.pad_token_id)
        metrics = self.update_log.rollout_metrics(experiences, self.rollout_batches_done + 1)
        if self.reduce_sum(merged.valid.sum().to(self.device, torch.float32)) > 0:
            self.compute_advantages(merged)
            with self.update_log.timed("update_s"):
                metrics.update(self.update(merged))
            self.guard.record_signal()
        else:
            self.guard.record_no_signal(self.rollout_batches_done + 1, self.reward.describe_failure())
        self.last_experiences = [merged]  # for callbacks (e.g. reward-model features), until the next update
        self.rollout_batches_done += 1
        if self.lr_schedulers() is not None:
            self.lr_schedulers().step()
        metrics.update(self.extra_metrics())
        metrics.update(self.reward.metrics())
        self.update_log.log(self, metrics, self.guard.counters())
        if self.rollout_batches_done >= self.total_updates:
            self.trainer.should_stop = True

    # -- the step helper -----------------------------------------------------------------------
    def optimizer_step_on(self, chunks: list[Experience],
                          loss_fn: Callable[[Experience], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                          losses_are_shares: bool = False) -> dict[str, float]:
        """One optimizer step on ``chunks`` (gradient accumulation): every method's step goes here.

        Each chunk's loss (a mean over its own samples or tokens) is weighted by its share of
        :meth:`loss_weight`, so the step follows the mean over all chunks; with
        ``losses_are_shares`` the chunk losses are already their shares of the step's loss (GRPO's
        aggregations normalise by counts summed over ranks, times the world size, so that the mean
        over ranks of a rank's summed shares is the step's loss) and are summed as they are, and the
        logged ``loss`` is that sum. Every chunk is backpropagated even when a loss is NaN (under
        DDP all ranks must run the same backward calls); whether to step is then decided by all
        ranks together (:func:`modules.run_guard.step_if_finite`).
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
        finite, grad_norm = step_if_finite(self, opt, finite)
        self.guard.record_step(finite, self.rollout_batches_done + 1)
        opt.zero_grad(set_to_none=True)
        out = {k: weighted_mean([m[k] for m in per_chunk], weights) for k in per_chunk[0]}
        if losses_are_shares:
            out["loss"] = float(sum(float(m["loss"]) for m in per_chunk))
        out["grad_norm"] = float(grad_norm)
        return out

    # -- checkpoints (what they hold: modules.run_guard) ----------------------------------------
    extra_state_modules: tuple[str, ...] = ()
    """Names of submodules whose whole state (buffers too) is checkpointed beside what requires grad."""

    def checkpointed_keys(self) -> set[str]:
        """State-dict keys a checkpoint keeps (:func:`modules.run_guard.checkpointed_keys`)."""
        return checkpointed_keys(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_run_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load_run_state(self, checkpoint)
