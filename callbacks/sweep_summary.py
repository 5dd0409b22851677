"""The held-out gain and its KL under fixed names in every logger's run summary, for sweeps.

A W&B sweep ranks runs by a value in each run's *summary*, and W&B's parallel-coordinates and
scatter panels plot summary values. :class:`callbacks.heldout.HeldOutEvaluation` logs its report
as ``heldout/*`` history rows; this callback copies the final report's headline numbers, when
training ends, to names that mean the same in every method:

- ``sweep/heldout_gain``: on − off of the training reward on the held-out prompts (the report's
  ``difference``), with ``sweep/heldout_gain_se`` (Welch) and ``sweep/heldout_gain_z``;
- ``sweep/heldout_kl_per_token``, ``sweep/heldout_kl_per_reply``: KL(on ‖ off) of the same replies;
- ``sweep/heldout_gain_eval``, ``sweep/heldout_gain_eval_se``: on − off under the evaluation
  judge (paired SE), where the method has one (SteeringVectorRL).

A W&B logger gets them in ``run.summary``; every other logger (CSV, TensorBoard) gets them as
metrics on the row of the last update. A report without judge answers writes nothing, so that a
sweep does not rank a run by a gain that was never measured. Put it after ``HeldOutEvaluation`` in
``trainer.callbacks`` (the sweeps append it: ``--trainer.callbacks+=callbacks.sweep_summary.SweepSummary``).
"""

from __future__ import annotations

import logging
import math

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.heldout import HeldOutEvaluation
from modules.errors import UserError
from modules.evaluation import HeldOutReport

log = logging.getLogger(__name__)

GAIN = "sweep/heldout_gain"
"""The name a sweep's ``metric.name`` uses (goal: maximize)."""
GAIN_SE = "sweep/heldout_gain_se"
GAIN_Z = "sweep/heldout_gain_z"
KL_PER_TOKEN = "sweep/heldout_kl_per_token"
KL_PER_REPLY = "sweep/heldout_kl_per_reply"
EVAL_GAIN = "sweep/heldout_gain_eval"
EVAL_GAIN_SE = "sweep/heldout_gain_eval_se"


def summary_values(report: HeldOutReport) -> dict[str, float]:
    """The summary entries of a held-out report (empty when no sample was judged)."""
    if report.samples_per_arm == 0:
        return {}
    values = {GAIN: report.difference, GAIN_SE: report.difference_se, GAIN_Z: report.z,
              KL_PER_TOKEN: report.kl_per_token, KL_PER_REPLY: report.kl_per_reply}
    if report.evaluation_judge:
        values[EVAL_GAIN] = report.evaluation_judge["difference"]
        values[EVAL_GAIN_SE] = report.evaluation_judge["paired_se"]
    return {name: float(value) for name, value in values.items()}


class SweepSummary(L.Callback):
    """Copy the final held-out report's gain and KL into every logger's summary (see the module doc)."""

    def __init__(self) -> None:
        self._heldout: HeldOutEvaluation | None = None
        self.written: dict[str, float] = {}
        """What the last run wrote (empty until training ends with a judged report)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        callbacks = list(trainer.callbacks)
        heldout = [c for c in callbacks if isinstance(c, HeldOutEvaluation)]
        if not heldout:
            raise UserError("SweepSummary needs a callbacks.heldout.HeldOutEvaluation in trainer.callbacks: "
                            "the summary is that callback's held-out report")
        if callbacks.index(heldout[0]) > callbacks.index(self):
            raise UserError("SweepSummary must come after HeldOutEvaluation in trainer.callbacks (it reads the "
                            "report HeldOutEvaluation makes when training ends)")
        self._heldout = heldout[0]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = self._heldout.last_report if self._heldout is not None else None
        values = summary_values(report) if report is not None else {}
        if not values:
            log.warning("SweepSummary: no judged held-out report (no held-out prompts, or every judge call "
                        "failed): %s is not written, and a sweep leaves this run out", GAIN)
            return
        self.written = values
        self._publish(trainer, max(pl_module.rollout_batches_done - 1, 0), values)

    @rank_zero_only
    def _publish(self, trainer: L.Trainer, step: int, values: dict[str, float]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # a NaN (gain_z without a standard error) would only confuse W&B's panels: left out there
                logger.experiment.summary.update({k: v for k, v in values.items() if not math.isnan(v)})
            else:
                logger.log_metrics(values, step=step)
