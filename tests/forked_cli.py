"""Run ``cli.main`` in a forked child of the test process (a test helper, not a test file).

A fresh ``python cli.py`` spends most of its time importing torch, Lightning and transformers
(10-20 s on a busy 2-core machine); a forked child starts with them imported and still dies for
real (``os._exit`` in a crash callback ends the child, never the tests). Output goes to files that
come back as the result's ``stdout``/``stderr``.

The child computes on one thread: OpenMP (which MKL's matrix products use) is not fork-safe, and a
child whose parent has already run a parallel region waits forever at its first multi-threaded
product for threads that were not copied into it.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _child(args: list[str], out_fd: int, err_fd: int) -> None:
    code = 70
    try:
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        import torch

        torch.set_num_threads(1)  # before any product: the parent's OpenMP threads are not in this process
        import modules.judges.background as background

        background._loop, background._lock = None, threading.Lock()  # the parent's loop thread is not here
        from cli import main

        try:
            main(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run_cli(*args, timeout_s: float = 600) -> Result:
    """``python cli.py *args`` as a forked child: its exit status, stdout and stderr."""
    args = [str(a) for a in args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(args, out.fileno(), err.fileno())
        deadline = time.monotonic() + timeout_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"cli {' '.join(args)} ran over {timeout_s} s")
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return Result(os.waitstatus_to_exitcode(status), out.read(), err.read())
