"""A progress bar that counts updates (rollout batches; the run has one endless epoch, so "Epoch 0/-2"
and the logger version that Lightning shows by default say nothing)."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class UpdateProgressBar(TQDMProgressBar):
    """Shows ``updates`` with reward, KL and reply length of the last update."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description("updates")
        self.train_progress_bar.reset(total=pl_module.total_updates)
        self.train_progress_bar.n = pl_module.rollout_batches_done
        self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        bar.n = pl_module.rollout_batches_done
        bar.set_postfix(self.get_metrics(trainer, pl_module))
        bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
