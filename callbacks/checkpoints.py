"""Evenly spaced checkpoints of the trainable state, written atomically, plus portable exports.

``EvenlySpacedCheckpoint`` is Lightning's ``ModelCheckpoint`` told *when* to save: after update
(rollout batch) ``ceil(k * total_updates / num_checkpoints)`` for ``k = 1..num_checkpoints`` (the
last of them is the final update), each as ``checkpoints/update{N:06d}.ckpt``, with
``checkpoints/last.ckpt`` refreshed at every save so that ``fit --ckpt_path last`` resumes from the
newest one. Updates are counted as rollout batches, whatever number of optimizer steps each makes.
A checkpoint holds only what the module's ``on_save_checkpoint`` keeps (the trainable state,
optimizer, counters, RNG), never the frozen base model.

A kill at any instant leaves a folder that ``fit --ckpt_path last`` turns into the one an
uninterrupted run writes. What happens at a checkpoint update, in order:

1. the update's ``metrics.csv`` row is written (Lightning would log it only after this callback),
   with any rows still buffered (:class:`callbacks.resumable_csv.ResumableCSVLogger`);
2. the module's portable exports (``export_artifacts``: for SteeringVectorRL
   ``vectors/update{N:06d}.pt`` and, at the end, ``steering_vector.pt``; for PPO the PEFT adapter
   folders);
3. ``checkpoints/update{N:06d}.ckpt``, then ``checkpoints/last.ckpt``; each records how many
   ``metrics.csv`` rows were on disk.

Every file is written to a hidden ``.<name>.partial`` in its own folder and renamed into place, so no
truncated file ever carries a real name and nothing is left outside the run folder (Lightning's own
writer would stage each checkpoint in ``$TMPDIR`` first: :class:`PartialFileCheckpointIO` replaces
it); leftover ``.partial`` files are removed when a run (re)starts. A write that fails (a full disk)
removes its ``.partial`` file and stops the run with one line naming the last good checkpoint,
which is left as it was. A resumed
run cuts ``metrics.csv`` back to the rows its checkpoint counted and computes every later update
again, identically, rewriting its exports. :func:`resolve_resume` picks the checkpoint for
``--ckpt_path last`` (``last.ckpt``, else the newest readable ``update*.ckpt``) and refuses an
unreadable ``--ckpt_path FILE`` before anything is written.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import fsspec.utils
import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.resumable_csv import ResumableCSVLogger
from modules.errors import UserError
from modules.files import partial_path

_UPDATE_FILE = re.compile(r"update(\d+)\.ckpt$")


def evenly_spaced_steps(total: int, count: int) -> list[int]:
    """``count`` update indices spread over ``1..total``, ending at ``total`` (fewer if total < count)."""
    if total < 1 or count < 1:
        return []
    return sorted({math.ceil(k * total / count) for k in range(1, count + 1)})


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from, in a few words (``None``: it can). A folder is DeepSpeed's
    form of a checkpoint: its ``latest`` file names the subfolder that holds the states."""
    path = Path(path)
    if path.is_dir():
        latest = path / "latest"
        tag = latest.read_text().strip() if latest.is_file() else ""
        if not tag or not any((path / tag).glob("*model_states.pt")):
            return "is a folder without a complete DeepSpeed checkpoint"
        return None
    if not path.is_file():
        return "does not exist"
    if not zipfile.is_zipfile(path):
        return "is truncated or not a checkpoint file"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a damaged archive or a foreign pickle
        return f"cannot be read ({type(err).__name__})"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "is not a Lightning checkpoint"
    return None


def resolve_resume(ckpt_path: str | None, checkpoint_dir: str | Path) -> tuple[str | None, str | None]:
    """The checkpoint ``fit`` should resume from, and a line to tell the user (or ``None``).

    ``last`` is ``last.ckpt`` when it is readable, else the newest readable ``update*.ckpt`` (the
    line says which, and names the bad file), else none: training starts from the beginning. A
    file given by name must be readable: otherwise :class:`UserError` names it.
    """
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry") or ckpt_path.startswith("registry:"):
        return ckpt_path, None
    if ckpt_path != "last":
        problem = checkpoint_problem(ckpt_path)
        if problem:
            raise UserError(f"--ckpt_path {ckpt_path} {problem}: give a .ckpt file from a run's checkpoints/ "
                            "folder, or --ckpt_path last")
        return ckpt_path, None
    folder = Path(checkpoint_dir)
    updates = sorted((p for p in folder.glob("update*.ckpt") if _UPDATE_FILE.search(p.name)),
                     key=lambda p: int(_UPDATE_FILE.search(p.name).group(1)), reverse=True)
    bad = []
    for path in [folder / "last.ckpt", *updates]:
        problem = checkpoint_problem(path)
        if problem is None:
            if path.name == "last.ckpt":
                return str(path), None
            why = "; ".join(bad) if bad else f"{folder / 'last.ckpt'} does not exist"
            return str(path), f"note: resuming from {path}, the newest readable checkpoint ({why})"
        if problem != "does not exist":
            bad.append(f"{path} {problem}")
    why = f" ({'; '.join(bad)})" if bad else ""
    return None, f"note: no readable checkpoint in {folder}{why}: training from the first update"


def check_checkpoint_fits(ckpt_path: str, module) -> None:
    """Refuse, before anything is written, a checkpoint file that lacks this module's trainable state
    (one written by another method, or with other options). DeepSpeed's folders are checked on load."""
    if Path(ckpt_path).is_dir() or not Path(ckpt_path).is_file():
        return
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    missing = module.checkpointed_keys() - set(checkpoint.get("state_dict", {}))
    if missing:
        writer = checkpoint.get("on_policy", {}).get("method")
        by = f"written by {writer}, " if writer and writer != type(module).__name__ else ""
        raise UserError(f"--ckpt_path {ckpt_path} does not fit {type(module).__name__} ({by}it lacks "
                        f"{sorted(missing)[:3]}): resume with the config that wrote it, or start a new run")


def remove_partial_files(run_dir: str | Path) -> list[Path]:
    """Delete the ``.<name>.partial`` files and folders that a killed run left in ``run_dir`` and its
    subfolders (one level down: checkpoints/, vectors/, adapters/)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for folder in [run_dir, *(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        for path in folder.glob(".*.partial"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class PartialFileCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing a local file in place (flushed to disk) instead of through
    fsspec's transaction, which stages it in ``$TMPDIR`` (left there for good by a kill, and copied
    across file systems when the run folder is on another one). :class:`EvenlySpacedCheckpoint`
    writes only to a ``.partial`` name and renames it, so the write itself need not be atomic."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or fsspec.utils.get_protocol(str(path)) != "file":
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())


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
        if num_checkpoints < 1:
            raise UserError(f"num_checkpoints must be at least 1, got {num_checkpoints}")
        self.num_checkpoints, self.export = num_checkpoints, export
        self.save_updates: list[int] = []
        self._last_update_saved = -1
        self._csv_rows: int | None = None  # metrics.csv rows on disk at the checkpoint being written
        self._resumed_csv_rows: int | None = None

    def _resolve_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """Lightning's ``fit(ckpt_path="last")`` asks every ModelCheckpoint for its ``last`` files before
        ``setup`` runs, so the folder is resolved here too (tests/test_lightning_private_api.py)."""
        self._resolve_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own plugin is kept
            trainer.strategy.checkpoint_io = PartialFileCheckpointIO()
        self.save_updates = evenly_spaced_steps(pl_module.total_updates, self.num_checkpoints)
        if trainer.is_global_zero and stage == "fit":
            remove_partial_files(Path(self.dirpath).parent)
            remove_partial_files(self.dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Cut metrics.csv back to the rows of the checkpoint resumed from (all of them on a fresh
        start); after resuming from an ``update*.ckpt`` of this run, make ``last.ckpt`` that file."""
        rows = self._resumed_csv_rows if trainer.ckpt_path else 0
        for logger in _csv_loggers(trainer):
            logger.keep_earlier_rows(rows)
        resumed = Path(trainer.ckpt_path) if trainer.ckpt_path else None
        last = Path(self.dirpath) / "last.ckpt"
        if trainer.is_global_zero and resumed is not None and resumed.parent.resolve() == last.parent.resolve() \
                and resumed.name != last.name:
            partial = partial_path(last)
            shutil.copyfile(resumed, partial)
            os.replace(partial, last)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        update = pl_module.rollout_batches_done
        if update not in self.save_updates or update == self._last_update_saved or trainer.sanity_checking:
            return
        try:
            if trainer.is_global_zero:
                self._write_metrics_row(trainer)
            if self.export:
                with pl_module.whole_weights():  # every rank gathers sharded weights; rank 0 writes
                    if trainer.is_global_zero:
                        pl_module.export_artifacts(Path(self.dirpath).parent, update,
                                                   final=update == pl_module.total_updates)
        except OSError as err:
            raise self._write_failed(f"the files of update {update}", err) from None
        self._save_update(trainer, update)
        self._last_update_saved = update

    def _save_update(self, trainer: L.Trainer, update: int) -> None:
        """``update{N:06d}.ckpt``, then ``last.ckpt``. Each path is recorded before its file is written
        (``best_model_path``, ``last_model_path``: part of the saved state), as ModelCheckpoint does."""
        self.best_model_path = self.format_checkpoint_name({"update": update})
        self._write_checkpoint(trainer, self.best_model_path)
        self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        self._write_checkpoint(trainer, self.last_model_path)

    def _write_metrics_row(self, trainer: L.Trainer) -> None:
        """Put this update's metrics row on disk before the checkpoint that counts it.

        Lightning logs a step's row after every ``on_train_batch_end`` hook, and this callback runs
        last among them (Lightning moves checkpoint callbacks to the end), so the row is complete
        here; the logger then skips Lightning's copy of it. Lightning has no public view of the row
        before it is logged: the logger connector's is read (tests/test_lightning_private_api.py).
        """
        self._csv_rows = None
        connector = trainer._logger_connector
        row = convert_tensors_to_scalars(connector.metrics["log"]) if connector.should_update_logs else {}
        step = row.pop("step", None)  # the row and step exactly as the connector's log_metrics makes them
        if step is not None:
            step = int(step)
        elif row:
            row.setdefault("epoch", trainer.current_epoch)
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in _csv_loggers(trainer):
            if row:
                self._csv_rows = logger.write_row_now(row, step)
            else:
                logger.save()
                self._csv_rows = len(logger.experiment.rows)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Saving is driven by update counts only."""

    def on_validation_end(self, trainer, pl_module) -> None:
        """Saving is driven by update counts only."""

    def on_train_end(self, trainer, pl_module) -> None:
        """Saving is driven by update counts only (a run resumed from its final checkpoint saves nothing)."""

    def _write_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = str(partial_path(filepath))
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)
        except OSError as err:  # a full disk, a folder that became read-only: keep the last good one
            _remove(partial)
            raise self._write_failed(f"checkpoint {filepath}", err) from None
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            _replace(partial, filepath)
        self._last_global_step_saved = trainer.global_step  # ModelCheckpoint's record, which loggers read
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _write_failed(self, what: str, err: OSError) -> UserError:
        last_good = resolve_resume("last", self.dirpath)[0] or "none (no checkpoint was written yet)"
        return UserError(f"could not write {what} ({err.strerror or err}); the last good checkpoint is "
                         f"{last_good}, left as it was: make room and resume with --ckpt_path last")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_update_saved": self._last_update_saved, "csv_rows": self._csv_rows}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._last_update_saved = state_dict.get("last_update_saved", -1)
        self._resumed_csv_rows = state_dict.get("csv_rows")


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def _replace(source: str, destination: str) -> None:
    """``os.replace``, also for a folder (DeepSpeed writes a checkpoint as one) over an existing folder:
    the old one is moved aside first (a kill in between leaves no ``last.ckpt``, and resume falls back
    to the newest ``update*.ckpt``; the moved-aside ``.partial`` folder is removed on the next start)."""
    if os.path.isdir(source) and os.path.isdir(destination):
        aside = os.path.join(os.path.dirname(destination), "." + os.path.basename(destination) + ".old.partial")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(destination, aside)
        os.replace(source, destination)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(source, destination)


def _csv_loggers(trainer: L.Trainer) -> list[ResumableCSVLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, ResumableCSVLogger)]
