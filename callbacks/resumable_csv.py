"""A CSV logger that survives crashes and ``--ckpt_path last``: Lightning's deletes ``metrics.csv``
on start, buffers rows, and appends in place (a kill mid-append leaves half a row).

Every save rewrites ``metrics.csv`` whole, atomically (``.metrics.csv.partial``, fsync, rename), so
the file always holds complete rows. Rows of an earlier run of the folder are kept on resume and cut
back to the point the run resumes from: the checkpoint callback
(:class:`callbacks.checkpoints.EvenlySpacedCheckpoint`) records in each checkpoint how many rows were
on disk when it was written, and writes the row of its own update *before* the checkpoint
(:meth:`ResumableCSVLogger.write_row_now`), since Lightning logs an update's row only after the
checkpoint callbacks have run. A fresh start (no checkpoint) drops the old rows. Without that
count (a checkpoint of an older version), rows from the first resumed step on are dropped.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from modules.files import write_text_atomically


def _step_of(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class _DurableWriter(ExperimentWriter):
    """Keeps every row in memory; each save rewrites the file atomically."""

    def __init__(self, log_dir: str) -> None:
        self.rows: list[dict[str, Any]] = []
        self._earlier: list[dict[str, Any]] | None = None  # an earlier run's rows, until we know what to keep
        self._written_now: tuple[int, dict] | None = None  # (step, row) written ahead of Lightning's logging
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                reader = csv.DictReader(file)
                self._earlier = [row for row in reader if None not in row and _step_of(row) is not None]
                self.metrics_keys = sorted(reader.fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        """Keep what is there."""

    def keep_earlier_rows(self, count: int | None) -> None:
        """Keep the first ``count`` rows of the earlier run (``None``: decide by step at the first save)."""
        if self._earlier is None or count is None:
            return
        self.rows = self._earlier[:count] + self.rows
        self._earlier = None
        self._rewrite()

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._written_now is not None and step == self._written_now[0]:
            written, self._written_now = self._written_now[1], None
            if {**metrics_dict, "step": step} == written:
                return  # already on disk
            self.rows = [row for row in self.rows if row is not written]  # a later hook logged more
        super().log_metrics(metrics_dict, step)

    def write_row_now(self, metrics: dict[str, float], step: int) -> int:
        """Log ``metrics`` at ``step`` and save now; Lightning's own logging of that row is then
        skipped. Returns how many rows are on disk."""
        self.log_metrics(metrics, step)
        self._written_now = (step, self.metrics[-1])
        self.save()
        return len(self.rows)

    def save(self) -> None:
        if not self.metrics:
            return
        if self._earlier is not None:  # no count given: drop the earlier run's rows from the first new step on
            first_new = min(int(m["step"]) for m in self.metrics)
            self.rows = [row for row in self._earlier if _step_of(row) < first_new] + self.rows
            self._earlier = None
        self.rows.extend(self.metrics)
        self.metrics = []
        self._rewrite()

    def _rewrite(self) -> None:
        self.metrics_keys = sorted(set(self.metrics_keys).union(*self.rows))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomically(self.metrics_file_path, buffer.getvalue())


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` is always whole and continues across resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _DurableWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _DurableWriter(log_dir=self.log_dir)
        return self._experiment

    def write_row_now(self, metrics: dict[str, float], step: int) -> int:
        """Write the row of ``step`` (and any rows still buffered) to disk now; returns the row count."""
        return self.experiment.write_row_now(metrics, step)

    def keep_earlier_rows(self, count: int | None) -> None:
        """On (re)start: keep this many rows of what an earlier run of the folder wrote."""
        self.experiment.keep_earlier_rows(count)
