"""The parts of Lightning that are not public API and that resume depends on, pinned.

Checked on Lightning 2.6.6. Each test names the file that relies on the part and why; when one fails
after an upgrade, that file must be adapted before the upgrade is taken, or resume may silently
write a different ``metrics.csv`` or checkpoints than an uninterrupted run.

- callbacks/checkpoints.py writes an update's ``metrics.csv`` row before the checkpoint that counts
  it. Lightning has no public view of the row before it logs it: the trainer's logger connector
  (``trainer._logger_connector.metrics["log"]``, ``.should_update_logs``) is read, and the row's step
  made as the connector makes it (``trainer.fit_loop.epoch_loop._batches_that_stepped``).
- callbacks/checkpoints.py overrides ``ModelCheckpoint._find_last_checkpoints``, which Lightning's
  ``fit(ckpt_path="last")`` calls before ``setup``, and keeps ``ModelCheckpoint._last_global_step_saved``
  (read by loggers that log checkpoints).
- cli.py overrides ``LightningCLI._parse_ckpt_path``, so that a checkpoint's saved hyperparameters
  never replace the config given.
"""

from __future__ import annotations

import csv
import inspect
import os

import lightning
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.connectors import checkpoint_connector
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

from callbacks.checkpoints import EvenlySpacedCheckpoint
from callbacks.resumable_csv import ResumableCSVLogger

CHECKED_ON = "2.6.6"


def pinned(ok: bool, what: str, user: str) -> None:
    """Fail with one message naming the Lightning part that changed and the file that relies on it."""
    if not ok:
        pytest.fail(f"Lightning {lightning.__version__} (checked on {CHECKED_ON}): {what}. {user} relies on it: "
                    "adapt that file before taking this Lightning version", pytrace=False)


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.fixture
def trainer(tmp_path):
    return lightning.Trainer(default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


def test_logger_connector_row_before_logging(trainer):
    user = "callbacks/checkpoints.py (EvenlySpacedCheckpoint._write_metrics_row)"
    connector = getattr(trainer, "_logger_connector", None)
    pinned(isinstance(connector, _LoggerConnector), "Trainer._logger_connector is gone or not a _LoggerConnector",
           user)
    for name in ("metrics", "should_update_logs"):
        pinned(isinstance(inspect.getattr_static(_LoggerConnector, name, None), property),
               f"_LoggerConnector.{name} is no longer a property", user)
    pinned(parameters(_LoggerConnector.log_metrics) == ["self", "metrics", "step"],
           f"_LoggerConnector.log_metrics{inspect.signature(_LoggerConnector.log_metrics)} changed", user)
    # the row and its step are made as log_metrics makes them: "step" popped from the row, else the
    # epoch added and the count of batches that stepped used
    source = inspect.getsource(_LoggerConnector.log_metrics)
    for piece in ('pop("step", None)', 'setdefault("epoch", self.trainer.current_epoch)',
                  "self.trainer.fit_loop.epoch_loop._batches_that_stepped", "convert_tensors_to_scalars(metrics)"):
        pinned(piece in source, f"_LoggerConnector.log_metrics no longer does {piece!r}", user)
    pinned("return self.trainer._results.metrics(on_step)" in inspect.getsource(_LoggerConnector),
           "_LoggerConnector.metrics no longer returns the results' metrics (with a 'log' entry)", user)


def test_batches_that_stepped(trainer):
    pinned(isinstance(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None), int),
           "trainer.fit_loop.epoch_loop._batches_that_stepped is gone",
           "callbacks/checkpoints.py (the step of a metrics row without one)")


def test_find_last_checkpoints():
    user = "callbacks/checkpoints.py (EvenlySpacedCheckpoint._find_last_checkpoints: fit(ckpt_path='last'))"
    pinned(callable(getattr(ModelCheckpoint, "_find_last_checkpoints", None)),
           "ModelCheckpoint._find_last_checkpoints is gone", user)
    pinned(parameters(ModelCheckpoint._find_last_checkpoints) == ["self", "trainer"],
           f"ModelCheckpoint._find_last_checkpoints{inspect.signature(ModelCheckpoint._find_last_checkpoints)} "
           "changed", user)
    pinned("callback._find_last_checkpoints(self.trainer)" in inspect.getsource(checkpoint_connector),
           "the checkpoint connector no longer asks each ModelCheckpoint for its last checkpoints", user)


def test_last_global_step_saved():
    pinned(hasattr(ModelCheckpoint(), "_last_global_step_saved"),
           "ModelCheckpoint._last_global_step_saved is gone",
           "callbacks/checkpoints.py (EvenlySpacedCheckpoint._write_checkpoint keeps it for loggers)")


def test_model_checkpoint_saves_only_through_overridden_hooks():
    """Every hook of ModelCheckpoint that can save is overridden (saving is driven by update counts,
    through ``.partial`` files); ``on_exception`` saves only with ``save_on_exception``, which is off."""
    user = "callbacks/checkpoints.py (EvenlySpacedCheckpoint: every save goes through a .partial file)"
    hooks = {name for name in vars(ModelCheckpoint) if name.startswith("on_") and callable(vars(ModelCheckpoint)[name])}
    overridden = {name for name in vars(EvenlySpacedCheckpoint) if name.startswith("on_")}
    pinned(hooks - overridden == {"on_exception"},
           f"ModelCheckpoint's hooks changed: {sorted(hooks - overridden)} are not overridden", user)
    pinned(EvenlySpacedCheckpoint().save_on_exception is False, "save_on_exception is on by default", user)
    callback = EvenlySpacedCheckpoint(dirpath="run/checkpoints")
    names = [os.path.basename(callback.format_checkpoint_name({"update": 7})),
             os.path.basename(callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST))]
    pinned(names == ["update000007.ckpt", "last.ckpt"], f"ModelCheckpoint.format_checkpoint_name now gives {names}",
           "callbacks/checkpoints.py (EvenlySpacedCheckpoint._save_update)")


def test_cli_parse_ckpt_path():
    user = "cli.py (RLCLI._parse_ckpt_path: a checkpoint's hyperparameters never replace the config)"
    pinned(callable(getattr(LightningCLI, "_parse_ckpt_path", None)), "LightningCLI._parse_ckpt_path is gone", user)
    pinned(parameters(LightningCLI._parse_ckpt_path) == ["self"],
           f"LightningCLI._parse_ckpt_path{inspect.signature(LightningCLI._parse_ckpt_path)} changed", user)
    init = inspect.getsource(LightningCLI.__init__)
    pinned("self._parse_ckpt_path()" in init and init.index("self.parse_arguments(") < init.index(
        "self._parse_ckpt_path()") < init.index("self.instantiate_classes()"),
        "LightningCLI.__init__ no longer calls _parse_ckpt_path between parsing and instantiating", user)


def test_csv_logger_uses_its_writer_through_the_logger_api(tmp_path):
    """CSVLogger drives its experiment writer (log_metrics, save, log_hparams, finalize): the durable
    writer keeps an earlier run's rows and writes whole files."""
    user = "callbacks/resumable_csv.py (ResumableCSVLogger and its writer)"
    (tmp_path / "metrics.csv").write_text("loss,step\n0.5,0\n0.25,1\n")
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="", version="")
    logger.log_hyperparams({"lr": 0.1})
    pinned((tmp_path / "hparams.yaml").is_file(), "CSVLogger.log_hyperparams no longer reaches the writer", user)
    logger.log_metrics({"loss": 0.125}, step=2)
    logger.finalize("success")
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    pinned([(r["loss"], r["step"]) for r in rows] == [("0.5", "0"), ("0.25", "1"), ("0.125", "2")],
           f"CSVLogger.log_metrics/finalize no longer reach the writer as before: metrics.csv holds {rows}", user)
