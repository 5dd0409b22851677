"""A progress bar that counts optimizer updates (the run has one endless epoch, so "Epoch 0/-2" and the
logger version that Lightning shows by default say nothing)."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class UpdateProgressBar(TQDMProgressBar):
    """Shows ``updates`` with reward, KL and reply length of the last update."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("updates")
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
