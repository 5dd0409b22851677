"""A CSV logger that survives ``--ckpt_path last``: Lightning's deletes ``metrics.csv`` on start.

On a resumed run the existing file is kept; rows logged after the checkpoint that the run resumes
from (the interrupted updates, which are done again) are dropped when the first new rows arrive.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        self._resumed_rows: list[dict] | None = None
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                reader = csv.DictReader(file)
                self.metrics_keys = sorted(reader.fieldnames or [])
                self._resumed_rows = list(reader)

    def _check_log_dir_exists(self) -> None:
        """Keep what is there."""

    def save(self) -> None:
        if self._resumed_rows is not None and self.metrics:
            first_new = min(int(m["step"]) for m in self.metrics)
            kept = [row for row in self._resumed_rows if row.get("step") and int(float(row["step"])) < first_new]
            self._record_new_keys()
            with open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._resumed_rows = None
        super().save()


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
