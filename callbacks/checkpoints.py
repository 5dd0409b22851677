"""Evenly spaced checkpoints of the trainable state, written atomically, plus portable exports.

``EvenlySpacedCheckpoint`` is Lightning's ``ModelCheckpoint`` told *when* to save: after update
(rollout batch) ``ceil(k * total_updates / num_checkpoints)`` for ``k = 1..num_checkpoints`` (the
last of them is the final update), each as ``checkpoints/update{N:06d}.ckpt``, with
``checkpoints/last.ckpt`` refreshed at every save so that ``fit --ckpt_path last`` resumes from the
newest one. Updates are counted as rollout batches, whatever number of optimizer steps each makes.
A checkpoint holds only what the module's ``on_save_checkpoint`` keeps (the trainable state,
optimizer, counters, RNG), never the frozen base model.

Every file is written to a temporary name and renamed into place, so a crash mid-write never
leaves a truncated file that looks like a checkpoint. Before each checkpoint the module's portable
exports are written (``export_artifacts``: for SteeringVectorRL ``vectors/update{N:06d}.pt`` and,
at the end, ``steering_vector.pt``; for PPO the PEFT adapter): a crash between the two leaves the
export of an update that the resumed run computes again, identically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


def evenly_spaced_steps(total: int, count: int) -> list[int]:
    """``count`` update indices spread over ``1..total``, ending at ``total`` (fewer if total < count)."""
    if total < 1 or count < 1:
        return []
    return sorted({math.ceil(k * total / count) for k in range(1, count + 1)})


class EvenlySpacedCheckpoint(ModelCheckpoint):
    """Save ``num_checkpoints`` evenly spaced checkpoints (the last at the final update) + ``last.ckpt``.

    Args:
        num_checkpoints: How many evenly spaced checkpoints to keep (the final update included).
        dirpath: Folder for the ``.ckpt`` files (default: ``<trainer.default_root_dir>/checkpoints``).
        export: Also write the module's portable exports (``export_artifacts``) at each checkpoint.
    """

    def __init__(self, num_checkpoints: int = 10, dirpath: str | None = None, export: bool = True):
        super().__init__(
            dirpath=dirpath, filename="update{update:06d}", auto_insert_metric_name=False, save_top_k=-1,
            save_last=True, every_n_train_steps=0, every_n_epochs=0, save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self.num_checkpoints, self.export = num_checkpoints, export
        self.save_updates: list[int] = []
        self._last_update_saved = -1

    def _resolve_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._resolve_dirpath(trainer)  # `fit --ckpt_path last` looks before setup runs
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)
        self.save_updates = evenly_spaced_steps(pl_module.total_updates, self.num_checkpoints)

    def _monitor_candidates(self, trainer: L.Trainer) -> dict:
        candidates = super()._monitor_candidates(trainer)
        candidates["update"] = torch.tensor(trainer.lightning_module.rollout_batches_done)
        return candidates

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        update = pl_module.rollout_batches_done
        if update not in self.save_updates or update == self._last_update_saved or trainer.sanity_checking:
            return
        if self.export and trainer.is_global_zero:
            pl_module.export_artifacts(Path(self.dirpath).parent, update, final=update == pl_module.total_updates)
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_update_saved = update

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Saving is driven by update counts only."""

    def on_validation_end(self, trainer, pl_module) -> None:
        """Saving is driven by update counts only."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = os.path.join(os.path.dirname(filepath), "." + os.path.basename(filepath) + ".partial")
        trainer.save_checkpoint(partial, self.save_weights_only)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_update_saved": self._last_update_saved}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._last_update_saved = state_dict.get("last_update_saved", -1)
