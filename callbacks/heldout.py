"""Held-out evaluation during and after training (intervention on vs off, same prompts and seeds).

Prints the report (rewards with standard errors, KL, lengths, a few replies side by side), logs
``heldout/*`` metrics, and writes ``heldout_update{N}.json`` into the run folder (N counts updates,
i.e. rollout batches).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from modules.evaluation import evaluate_intervention


class HeldOutEvaluation(L.Callback):
    """Evaluate the intervention on the datamodule's held-out prompts.

    Args:
        samples_per_prompt: Sampled replies per prompt and arm (each arm gets prompts × this).
        max_prompts: Use at most this many held-out prompts (0: all).
        every_n_updates: Also evaluate every N updates (0: only when training ends).
        batch_size: Prompts per generate call.
        show_examples: Replies printed side by side (vector off / on).
        seed: Sampling seed of the evaluation (the same for both arms).
    """

    def __init__(self, samples_per_prompt: int = 2, max_prompts: int = 0, every_n_updates: int = 0,
                 batch_size: int = 16, show_examples: int = 3, seed: int = 12345):
        self.samples_per_prompt, self.max_prompts, self.every_n_updates = samples_per_prompt, max_prompts, every_n_updates
        self.batch_size, self.show_examples, self.seed = batch_size, show_examples, seed
        self.last_report = None

    def _records(self, trainer: L.Trainer) -> list[dict]:
        records = getattr(trainer.datamodule, "heldout_records", []) if trainer.datamodule else []
        return records[: self.max_prompts] if self.max_prompts else records

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        update = pl_module.rollout_batches_done
        if self.every_n_updates and update % self.every_n_updates == 0 and update < pl_module.total_updates:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = self._records(trainer)
        if not records:
            return
        report = evaluate_intervention(
            pl_module, [r["prompt"] for r in records], self.samples_per_prompt, self.seed, self.batch_size,
            getattr(trainer.datamodule, "system_prompt", None), self.show_examples,
            progress=trainer.is_global_zero, records=records,
        )
        self.last_report = report
        self._publish(trainer, pl_module.rollout_batches_done, report)

    @rank_zero_only
    def _publish(self, trainer: L.Trainer, update: int, report) -> None:
        print(f"\n[update {update}] " + report.format(), flush=True)
        metrics = {f"heldout/{k}": v for k, v in report.as_dict().items() if isinstance(v, (int, float))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=max(update - 1, 0))  # the row of the update it follows
        out = Path(trainer.default_root_dir) / f"heldout_update{update:06d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.as_dict(), indent=2))
