"""The run's safety rules and what its checkpoints hold.

Before anything runs, :func:`check_loop_options` refuses options that cannot work, with one line.

No step without a signal: an update whose rollout batch has no valid reward (a judge that stopped
answering) takes no optimizer step and is counted; ``max_updates_without_signal`` of them in a row
stop the run with one line that names the reward. An optimizer step whose loss or gradient is
NaN/inf is skipped on every rank together (:func:`step_if_finite`) and counted;
``max_skipped_updates`` in a row stop the run. :class:`RunGuard` keeps the counts and applies both
rules; :class:`TrainingStopped` is the one line the user sees.

What a checkpoint holds (:func:`save_run_state`): only what requires grad (a steering vector, LoRA
weights, a value head) plus any module listed in ``extra_state_modules`` (e.g. a discriminator's
buffers), the optimizer and scheduler (written by Lightning), the loop counters, the reward's own
state and the RNG states, so that ``fit --ckpt_path last`` continues exactly where an uninterrupted
run would be. The frozen base model is rebuilt from its id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from modules.errors import UserError
from modules.sharding import deepspeed_engine, total_norm

if TYPE_CHECKING:
    from modules.on_policy import OnPolicyModule

log = logging.getLogger(__name__)


class TrainingStopped(UserError):
    """Training cannot make progress (no reward signal, NaN losses); checkpoints so far are intact."""


def check_loop_options(module: OnPolicyModule) -> None:
    """Raise :class:`UserError` for a loop option that cannot work."""
    counts = {"batch_size": module.batch_size, "grad_accum": module.grad_accum,
              "samples_per_prompt": module.samples_per_prompt, "total_updates": module.total_updates,
              "max_new_tokens": module.sampling.max_new_tokens,
              "max_skipped_updates": module.guard.max_skipped_updates,
              "max_updates_without_signal": module.guard.max_updates_without_signal,
              "update_batch_size": module.update_batch_size, "generation_batch_size": module.generation_batch_size}
    for name, value in counts.items():
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if module.batch_size % module.samples_per_prompt:
        raise UserError(f"samples_per_prompt ({module.samples_per_prompt}) must divide batch_size "
                        f"({module.batch_size}): a group of replies to one prompt is never split across micro-batches")
    if module.generation_batch_size % module.samples_per_prompt:
        raise UserError(f"samples_per_prompt ({module.samples_per_prompt}) must divide generation_batch_size "
                        f"({module.generation_batch_size}): a group of replies is generated in one call")
    if not module.sampling.temperature > 0:
        raise UserError(f"temperature must be > 0, got {module.sampling.temperature} "
                        "(sampling needs a positive temperature)")
    if not 0 < module.sampling.top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {module.sampling.top_p}")
    if not module.lr > 0:
        raise UserError(f"lr must be > 0, got {module.lr}")
    for name, value in (("weight_decay", module.weight_decay), ("max_grad_norm", module.max_grad_norm),
                        ("warmup_updates", module.warmup_updates)):
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
    if module.lr_schedule not in ("constant", "linear", "cosine"):
        raise UserError(f"unknown lr_schedule '{module.lr_schedule}': use constant, linear or cosine")
    if not 0 <= module.update_log.reward_ema_decay < 1:
        raise UserError(f"reward_ema_decay must be in [0, 1), got {module.update_log.reward_ema_decay}")


@dataclass
class RunGuard:
    """Counts updates without a reward signal and skipped optimizer steps; stops a run that cannot
    make progress."""

    max_skipped_updates: int
    max_updates_without_signal: int
    skipped_updates: int = 0
    """Optimizer steps skipped for a NaN/inf loss or gradient, over the run."""
    skipped_in_a_row: int = 0
    updates_without_signal: int = 0
    """Updates whose rollout batch had no valid reward, over the run."""
    without_signal_in_a_row: int = 0

    def record_signal(self) -> None:
        self.without_signal_in_a_row = 0

    def record_no_signal(self, update: int, failure: str) -> None:
        """Update ``update`` (1-based) had no valid reward; ``failure`` says what to check."""
        self.updates_without_signal += 1
        self.without_signal_in_a_row += 1
        log.warning("update %d had no valid reward (%s): no optimizer step", update, failure)
        if self.without_signal_in_a_row >= self.max_updates_without_signal:
            raise TrainingStopped(
                f"{self.without_signal_in_a_row} updates in a row had no valid reward: {failure}. "
                "The checkpoints written so far are intact: fix the reward and resume with --ckpt_path last")

    def record_step(self, finite: bool, update: int) -> None:
        """An optimizer step of update ``update`` (1-based) was taken (``finite``) or skipped."""
        if finite:
            self.skipped_in_a_row = 0
            return
        self.skipped_updates += 1
        self.skipped_in_a_row += 1
        log.warning("skipped an optimizer step of update %d: the loss or gradient was NaN/inf", update)
        if self.skipped_in_a_row >= self.max_skipped_updates:
            raise TrainingStopped(f"{self.skipped_in_a_row} optimizer steps in a row had a NaN/inf loss or "
                                  "gradient: lower lr, check the reward for NaN, and resume with --ckpt_path last")

    def counters(self) -> dict[str, float]:
        """The run's counts, as logged each update."""
        return {"updates_without_signal": float(self.updates_without_signal),
                "skipped_updates": float(self.skipped_updates)}

    def state_dict(self) -> dict[str, int]:
        return {"skipped_updates": self.skipped_updates, "updates_without_signal": self.updates_without_signal}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_updates = state.get("skipped_updates", 0)
        self.updates_without_signal = state.get("updates_without_signal", 0)


def step_if_finite(module: OnPolicyModule, optimizer, loss_finite: bool) -> tuple[bool, torch.Tensor]:
    """Clip and step ``optimizer`` unless a rank's loss or gradient is NaN/inf (all ranks decide
    together); returns whether the step was applied and the gradient norm before clipping.

    Clipping goes through Lightning's ``clip_gradients`` (correct under FSDP). Under DeepSpeed the
    engine holds the gradients, clips them and skips a step whose gradient norm is NaN/inf (a NaN
    loss gives one); its step must run for it to reset its gradient partitions
    (see :func:`modules.sharding.deepspeed_engine`).
    """
    strategy = module.trainer.strategy
    engine = deepspeed_engine(strategy)
    if engine is not None:
        optimizer.step()
        grad_norm = torch.tensor(float(engine.get_global_grad_norm() or 0.0))
        return strategy.reduce_boolean_decision(loss_finite, all=True) and engine.was_step_applied(), grad_norm
    grads = [p.grad for g in optimizer.optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = total_norm(grads)
    finite = strategy.reduce_boolean_decision(loss_finite and bool(torch.isfinite(grad_norm)), all=True)
    if finite:
        if module.max_grad_norm > 0:
            module.clip_gradients(optimizer, gradient_clip_val=module.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
    return finite, grad_norm


def checkpointed_keys(module: OnPolicyModule) -> set[str]:
    """State-dict keys a checkpoint keeps: parameters that require grad + ``extra_state_modules``."""
    keys = {name for name, p in module.named_parameters() if p.requires_grad}
    prefixes = tuple(f"{m}." for m in module.extra_state_modules)
    return keys | {k for k in module.state_dict() if prefixes and k.startswith(prefixes)}


def save_run_state(module: OnPolicyModule, checkpoint: dict) -> None:
    """Keep only the trainable state in ``checkpoint`` and add the loop's own under ``on_policy``."""
    keep = module.checkpointed_keys()
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint["on_policy"] = {
        "method": type(module).__name__,
        "rollout_batches_done": module.rollout_batches_done,
        "reward_ema": module.update_log.reward_ema,
        **module.guard.state_dict(),
        "reward_state": module.reward.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def load_run_state(module: OnPolicyModule, checkpoint: dict) -> None:
    """Restore what :func:`save_run_state` wrote; refuse a checkpoint without this method's trainable state."""
    missing = module.checkpointed_keys() - set(checkpoint["state_dict"])  # names only, under sharded strategies
    if missing:
        raise UserError(f"the checkpoint lacks trainable state {sorted(missing)[:5]}: "
                        "was it written by this method with the same options?")
    state = checkpoint.get("on_policy", {})
    module.rollout_batches_done = state.get("rollout_batches_done", 0)
    module.update_log.reward_ema = state.get("reward_ema")
    module.guard.load_state_dict(state)
    if state.get("reward_state"):
        module.reward.load_state_dict(state["reward_state"])
    if state.get("torch_rng") is not None:
        torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        # the saving node may have seen more GPUs than this one: restore the ones that exist here
        torch.cuda.set_rng_state_all(state["cuda_rng"][: torch.cuda.device_count()])
