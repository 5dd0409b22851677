"""The learning tests' runs in background processes, several at once (a test helper, not a test file).

A learning test trains a real model for minutes, and one run keeps two CPU cores only about 70 %
busy (small GEMMs, Python between them). So each learning test names a function that trains and
evaluates (``@pytest.mark.learning_run("tests.test_learning_ppo:run")``) and asserts on what it
returns. When the first of them asks (the ``learning_runs`` fixture), every selected one is started as
``python -m tests.background TARGET OUT``: as many at a time as there are cores, up to the number of
runs, each with ``cores // at a time`` threads (on 2 cores: two runs of one thread), longest first.
A test then waits for its own run. A run that fails fails its test with the end of its log.

``RLI_LEARNING_PARALLEL=1`` runs them one at a time with every core.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MARKER = "learning_run"
ROOT = Path(__file__).resolve().parents[1]


def report_of(data: dict):
    """A :class:`modules.evaluation.HeldOutReport` back from its ``as_dict()`` (as a run returns it)."""
    from dataclasses import fields

    from modules.evaluation import HeldOutReport

    names = {f.name for f in fields(HeldOutReport)}
    return HeldOutReport(**{key: value for key, value in data.items() if key in names})


def call(target: str, folder: Path) -> dict:
    """Import ``module:function`` and call it with a work folder."""
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)(folder)


class BackgroundRuns:
    """Runs ``targets`` (``module:function``) in child processes, ``parallel`` at a time."""

    def __init__(self, targets: list[str], folder: Path, parallel: int | None = None):
        cores = os.cpu_count() or 2
        wanted = parallel or int(os.environ.get("RLI_LEARNING_PARALLEL", "0")) or cores
        self.parallel = max(1, min(wanted, len(targets) or 1))
        self.threads = max(1, cores // self.parallel)
        self.folder, self.pending = folder, list(targets)
        self.running: dict[str, subprocess.Popen] = {}
        self.finished: dict[str, int] = {}

    def _paths(self, target: str) -> tuple[Path, Path, Path]:
        stem = target.replace(":", ".")
        return self.folder / f"{stem}.json", self.folder / f"{stem}.log", self.folder / stem

    def _start(self, target: str) -> None:
        out, log, work = self._paths(target)
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        with open(log, "w") as handle:
            self.running[target] = subprocess.Popen(
                [sys.executable, "-m", "tests.background", target, str(out), str(work), str(self.threads)],
                cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)

    def _fill(self) -> None:
        while self.pending and len(self.running) < self.parallel:
            self._start(self.pending.pop(0))

    def result(self, target: str) -> dict:
        """What ``target`` returned; waits for it (starting it first if nobody asked for it yet)."""
        if target not in self.finished and target not in self.running and target not in self.pending:
            self.pending.insert(0, target)
        while target not in self.finished:
            self._fill()
            for name, process in list(self.running.items()):
                if process.poll() is not None:
                    self.finished[name] = process.returncode
                    del self.running[name]
            if target not in self.finished:
                time.sleep(0.5)
        self._fill()  # keep the cores busy for the next tests
        out, log, _ = self._paths(target)
        if self.finished[target] != 0 or not out.exists():
            tail = log.read_text()[-6000:] if log.exists() else "(no log)"
            raise AssertionError(f"the background run {target} failed (exit {self.finished[target]}):\n{tail}")
        return json.loads(out.read_text())

    def stop(self) -> None:
        for process in self.running.values():
            process.kill()
            process.wait()
        self.running.clear()


def main() -> None:
    target, out, work, threads = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    result = call(target, work)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["threads"] = threads
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.replace(out)


if __name__ == "__main__":
    main()
