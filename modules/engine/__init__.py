"""The rollout engine behind :func:`modules.rollout.rollout` (see :mod:`modules.engine.engine`)."""

from __future__ import annotations

import weakref

from modules.engine.engine import EngineOutput, RolloutEngine
from modules.engine.support import Unsupported

_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model) -> RolloutEngine:
    """The engine of ``model`` (one per model object, so its captured graphs are reused)."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = RolloutEngine(model)
    return engine


__all__ = ["EngineOutput", "RolloutEngine", "Unsupported", "engine_for"]
