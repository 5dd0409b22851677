"""The learning tests' background runner: runs come back from child processes, at most ``parallel``
at a time with the cores shared out, and a failed run fails with its log."""

from __future__ import annotations

import os
import time

import pytest

from tests.background import BackgroundRuns


def sleepy(folder) -> dict:
    """A run that notes when it ran, in which process, with how many threads."""
    import torch

    started = time.time()
    time.sleep(1.0)
    return {"pid": os.getpid(), "threads": torch.get_num_threads(), "start": started, "end": time.time(),
            "folder": str(folder)}


def broken(folder) -> dict:
    raise ValueError("this run breaks on purpose")


def test_runs_come_back_from_child_processes_two_at_a_time(tmp_path):
    targets = [f"tests.test_background:sleepy{suffix}" for suffix in ("", "_again", "_third")]
    runs = BackgroundRuns(targets, tmp_path, parallel=2)
    try:
        results = [runs.result(t) for t in targets]
    finally:
        runs.stop()
    assert len({r["pid"] for r in results} | {os.getpid()}) == 4  # each in its own process
    cores = os.cpu_count() or 2
    assert all(r["threads"] == max(1, cores // 2) for r in results)
    first, second, third = results
    assert first["start"] < second["end"] and second["start"] < first["end"]  # the first two overlapped
    assert third["start"] >= min(first["end"], second["end"]) - 0.05  # the third waited for a free slot
    assert len({r["folder"] for r in results}) == 3


def test_a_failed_run_fails_with_its_log(tmp_path):
    runs = BackgroundRuns(["tests.test_background:broken"], tmp_path)
    with pytest.raises(AssertionError, match="this run breaks on purpose"):
        runs.result("tests.test_background:broken")


sleepy_again = sleepy_third = sleepy
