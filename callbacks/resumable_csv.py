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

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from modules.files import write_text_atomically


def _step_of(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class _DurableWriter:
    """The experiment writer of :class:`ResumableCSVLogger`: what ``CSVLogger`` asks of its writer
    (``log_metrics``, ``log_hparams``, ``save``, the unsaved rows in ``metrics``), with every row kept
    in memory and each save rewriting the file atomically. Lightning's own writer is not extended: on
    start it deletes ``metrics.csv``, and it appends in place."""

    NAME_METRICS_FILE = "metrics.csv"
    NAME_HPARAMS_FILE = "hparams.yaml"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self.metrics: list[dict[str, Any]] = []  # rows logged since the last save
        self.metrics_keys: list[str] = []
        self.hparams: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self._earlier: list[dict[str, Any]] | None = None  # an earlier run's rows, until we know what to keep
        self._written_now: tuple[int, dict] | None = None  # (step, row) written ahead of Lightning's logging
        os.makedirs(log_dir, exist_ok=True)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                reader = csv.DictReader(file)
                self._earlier = [row for row in reader if None not in row and _step_of(row) is not None]
                self.metrics_keys = sorted(reader.fieldnames or [])

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        save_hparams_to_yaml(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), self.hparams)

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
        row = {key: value.item() if isinstance(value, Tensor) else value for key, value in metrics_dict.items()}
        row["step"] = len(self.metrics) if step is None else step
        self.metrics.append(row)

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

    _writer: _DurableWriter | None = None  # made on first use, on rank 0 only

    @property
    @rank_zero_experiment
    def experiment(self) -> _DurableWriter:
        if self._writer is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._writer = _DurableWriter(log_dir=self.log_dir)
        return self._writer

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._writer is not None:  # a process that never logged has nothing to save
            self.save()

    def write_row_now(self, metrics: dict[str, float], step: int) -> int:
        """Write the row of ``step`` (and any rows still buffered) to disk now; returns the row count."""
        return self.experiment.write_row_now(metrics, step)

    def keep_earlier_rows(self, count: int | None) -> None:
        """On (re)start: keep this many rows of what an earlier run of the folder wrote."""
        self.experiment.keep_earlier_rows(count)
