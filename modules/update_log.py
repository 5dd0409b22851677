"""What the loop logs once per update (one rollout batch), and how it combines over ranks.

Each update logs its rollout's figures (:meth:`UpdateLog.rollout_metrics`: reward mean, spread and
EMA, response length, sampling throughput, each reward part), the method's update metrics, its
``extra_metrics``, the reward's own (judge requests, failures, latency), how long each stage took
(``time/*``), the run's counts of updates without signal and skipped steps, the learning rate and
the peak GPU memory. What an update did not do (no optimizer step: no loss, no grad norm) is logged
as NaN, never as the previous update's value.

Under several ranks, logged metrics are averaged over ranks, except counts of events (judge
requests, failures, retries, cache hits, parse failures), which are summed, and peak memory, of
which the largest rank's is logged (:func:`reduction_over_ranks`).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch

from modules.experience import Experience
from modules.rl.advantages import ema_update, masked_mean, masked_std

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)

EVENT_COUNTS = ("judge/requests", "judge/cache_hits", "judge/failed", "judge/failed_requests", "judge/retries",
                "parse_failures")


def counts_events(name: str) -> bool:
    """Whether a metric counts events on its rank (summed over ranks) rather than measuring a mean."""
    return name.endswith(EVENT_COUNTS) or "parse_failure/" in name


def reduction_over_ranks(name: str) -> str:
    """How a logged metric combines over ranks: ``sum`` (counts), ``max`` (peak memory) or ``mean``."""
    return "sum" if counts_events(name) else "max" if name.startswith("memory/") else "mean"


@dataclass
class UpdateLog:
    """The logging state of a run: the reward EMA, the current update's stage timings, and what
    the previous update logged."""

    reward_ema_decay: float
    reward_ema: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage of the current update, logged as ``time/<name>``."""
    started: float = 0.0
    warned_flat: bool = False
    logged_last_update: set[str] = field(default_factory=set)

    def start(self) -> None:
        """A new update begins: its timings start empty and its clock now."""
        self.timings = {}
        self.started = time.perf_counter()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the seconds the context takes as ``time/<name>`` (not when it raises)."""
        started = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - started

    def rollout_metrics(self, experiences: list[Experience], update: int) -> dict[str, float]:
        """Figures of update ``update``'s (1-based) rollouts; updates the reward EMA."""
        rewards = torch.cat([e.rewards.values for e in experiences])
        valid = torch.cat([e.rewards.valid for e in experiences])
        lengths = torch.cat([e.rollout.lengths.float().cpu() for e in experiences])
        tokens = sum(e.rollout.num_tokens for e in experiences)
        gen_seconds = sum(e.rollout.seconds for e in experiences)
        mean = float(masked_mean(rewards, valid)) if valid.any() else float("nan")
        if valid.any():
            self.reward_ema = ema_update(self.reward_ema, mean, self.reward_ema_decay)
        self.timings["generate_s"] = gen_seconds
        metrics = {
            "reward/mean": mean,
            "reward/std": float(masked_std(rewards, valid)),
            "reward/ema": self.reward_ema if self.reward_ema is not None else float("nan"),
            "response/length": float(lengths.mean()),
            "rollout/tokens_per_s": tokens / max(gen_seconds, 1e-9),
            "judge/failed": float((~valid).sum()),
        }
        self.warn_if_rewards_are_flat(rewards, valid, update)
        for name in experiences[0].rewards.parts:
            values = torch.cat([e.rewards.parts[name] for e in experiences])
            metrics[f"reward/{name}"] = float(masked_mean(values, valid)) if valid.any() else float("nan")
        return metrics

    def warn_if_rewards_are_flat(self, rewards: torch.Tensor, valid: torch.Tensor, update: int) -> None:
        """Once per run: every valid reward of a rollout batch equal means there is nothing to learn from."""
        if self.warned_flat or int(valid.sum()) < 2:
            return
        values = rewards[valid]
        if bool((values == values[0]).all()):
            self.warned_flat = True
            log.warning("every reward of update %d is %.4g: advantages are 0 and the policy learns nothing from "
                        "them. Check the reward (a rating judge whose digits get negligible probability, or a "
                        "judge that ignores the reply, gives one value to everything)", update, float(values[0]))

    def log(self, module: L.LightningModule, metrics: dict[str, float], counters: dict[str, float]) -> None:
        """Log one update's ``metrics`` with its timings, the run's ``counters``, the learning rate
        and peak memory, each reduced over ranks as :func:`reduction_over_ranks` says; and the
        progress bar's reward, KL and length."""
        metrics = dict(metrics)
        metrics.update({f"time/{k}": v for k, v in self.timings.items()})
        metrics["time/rollout_batch_s"] = time.perf_counter() - self.started
        metrics.update(counters)
        metrics["lr"] = module.optimizers().param_groups[0]["lr"]
        if module.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(module.device) / 2**30
        # what this update did not do (no optimizer step: no loss, no grad norm) is logged as NaN, never
        # as the previous update's value (Lightning keeps a step metric's last value until it is logged again)
        metrics.update({k: float("nan") for k in self.logged_last_update - metrics.keys()})
        self.logged_last_update = set(metrics)
        for reduction in ("mean", "sum", "max"):  # the same keys on every rank, in the same order
            group = {k: v for k, v in metrics.items() if reduction_over_ranks(k) == reduction}
            module.log_dict(group, on_step=True, on_epoch=False, batch_size=1, sync_dist=True, reduce_fx=reduction)
        module.log_dict(
            {"reward": metrics["reward/mean"], "kl": metrics.get(module.progress_bar_kl, float("nan")),
             "len": metrics["response/length"]},
            on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1,
        )


def weighted_mean(values: list[torch.Tensor], weights: list[float]) -> float:
    """The mean of ``values`` weighted by ``weights`` (the plain mean when no weight is positive)."""
    total = sum(weights)
    if total <= 0:
        return float(torch.stack([v.float() for v in values]).mean())
    return float(sum(float(v) * w for v, w in zip(values, weights)) / total)
