"""A callback that kills the process the hard way (no cleanup) when an update is about to start."""

import os

import lightning as L


class CrashAt(L.Callback):
    """Exit with status 17 before update ``update + 1`` starts (after ``update`` rollout batches)."""

    def __init__(self, update: int):
        self.update = update

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollout_batches_done == self.update:
            os._exit(17)
