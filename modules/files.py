"""Files a run writes, written so that a kill at any instant never leaves a truncated file under
its real name.

Every writer here goes through :func:`atomic_path`: the content goes to a hidden
``.<name>.partial`` beside the destination (same folder, so the final rename never crosses a file
system), is flushed to disk, and is renamed into place. A failure (a full disk, a kill) leaves at
most the ``.partial`` file, which :func:`callbacks.checkpoints.remove_partial_files` deletes when a
run (re)starts; the destination keeps its previous complete content.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def partial_path(path: str | Path) -> Path:
    """The hidden temporary name beside ``path``: ``<folder>/.<name>.partial``."""
    path = Path(path)
    return path.with_name("." + path.name + ".partial")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write; on success rename it to ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """``text`` into ``path`` through ``.<name>.partial`` + fsync + rename: never half a file."""
    with atomic_path(path) as partial, open(partial, "w", newline="") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json_atomically(path: str | Path, data: Any) -> None:
    """``data`` as strict JSON (a figure that was not measured, NaN in memory, is written as null)."""
    write_text_atomically(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def save_figure_atomically(fig, path: str | Path, **savefig_options) -> None:
    """A matplotlib figure saved to ``path`` (its format from the suffix) through a ``.partial`` file."""
    path = Path(path)
    with atomic_path(path) as partial:
        fig.savefig(partial, format=path.suffix.lstrip(".") or "png", **savefig_options)
