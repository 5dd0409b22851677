"""Callbacks that kill the process the hard way (``os._exit``: no cleanup, no flushing of Python
buffers), to test what a crash leaves behind and how ``--ckpt_path last`` recovers from it.

``CrashAt`` kills between updates. ``CrashAtWrite`` kills at one chosen write of the run folder:
every writer in the project puts a file (or folder) in place by renaming a hidden ``.partial``
(``os.replace`` or ``os.rename``, which ``Path.rename`` and ``Path.replace`` call) or writes it
whole (``Path.write_text``); these are patched so that the process dies *during* a chosen write (the
``.partial`` is cut to half its size and never renamed, as a kill in mid-write leaves it) or right
*after* it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L

CRASH_STATUS = 17


class CrashAt(L.Callback):
    """Exit with status 17 before update ``update + 1`` starts (after ``update`` rollout batches)."""

    def __init__(self, update: int):
        self.update = update

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollout_batches_done == self.update:
            os._exit(CRASH_STATUS)


def _cut_in_half(path: Path) -> None:
    """What a kill in mid-write leaves: a file cut short, or a folder missing its largest file."""
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        if files:
            files[-1].unlink()
    elif path.is_file():
        os.truncate(path, path.stat().st_size // 2)


class CrashAtWrite(L.Callback):
    """Exit with status 17 at the ``occurrence``-th write whose destination ends with ``target``
    (e.g. ``checkpoints/last.ckpt``, ``vectors/update000004.pt``, ``metrics.csv``), counting from
    the start of update ``update`` (1-based) on, end-of-training writes included.

    Args:
        update: The update (rollout batch, 1-based) from whose start writes are counted.
        target: The end of the destination path, with ``/`` separators.
        when: ``during`` (the ``.partial`` is cut short and never renamed; ``write_text`` writes
            half the text) or ``after`` (the write completes).
        occurrence: Which matching write (1 = the first).
    """

    def __init__(self, update: int, target: str, when: str = "during", occurrence: int = 1):
        if when not in ("during", "after"):
            raise ValueError("when must be 'during' or 'after'")
        self.update, self.target, self.when, self.occurrence = update, target, when, occurrence
        self.armed = False
        self.seen = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._patch()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollout_batches_done == self.update - 1:
            self.armed = True

    def _matches(self, destination) -> bool:
        if not self.armed or not str(Path(destination).as_posix()).endswith(self.target):
            return False
        self.seen += 1
        return self.seen == self.occurrence

    def _die(self, what: str) -> None:
        print(f"[crash] {self.when} {what}", file=sys.stderr, flush=True)
        os._exit(CRASH_STATUS)

    def _patch(self) -> None:
        crash = self
        os_replace, os_rename = os.replace, os.rename
        write_text = Path.write_text  # Path.rename and Path.replace go through os.rename / os.replace

        def renamer(original):
            def rename(src, dst, *args, **kwargs):
                if not crash._matches(dst):
                    return original(src, dst, *args, **kwargs)
                if crash.when == "during":
                    _cut_in_half(Path(src))
                else:
                    original(src, dst, *args, **kwargs)
                crash._die(f"renaming {src} -> {dst}")
            return rename

        def text_writer(path, data, *args, **kwargs):
            if not crash._matches(path):
                return write_text(path, data, *args, **kwargs)
            write_text(path, data[: len(data) // 2] if crash.when == "during" else data, *args, **kwargs)
            crash._die(f"writing {path}")

        os.replace, os.rename = renamer(os_replace), renamer(os_rename)
        Path.write_text = text_writer
