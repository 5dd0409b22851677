"""Batch the judge calls of all micro-batches of an update into one call.

Without this callback, each micro-batch's judge requests are sent as soon as its rollout exists,
so a remote judge works while the next micro-batch is generated. With it, the requests of every
micro-batch of an update are queued and sent as one batch (deduplicated, cached) when the first
reward is needed: better for a local judge, which then runs large forward passes and never
competes with generation for the device, and for batch-priced APIs.
"""

from __future__ import annotations

import lightning as L


class JudgeBatching(L.Callback):
    """Send the judge requests of all micro-batches of one update as a single batch."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.batch_judge_calls = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.batch_judge_calls = False
