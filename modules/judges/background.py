"""One persistent asyncio event loop on a daemon thread, shared by every judge.

Async clients (``openai.AsyncOpenAI``) bind their connection pools to the loop they first ran on,
so judges must always run on the same loop. Training code submits coroutines with :func:`submit`
(non-blocking, returns a ``concurrent.futures.Future``) so that judge calls proceed while the next
micro-batch is being generated; plain code calls :func:`run` and waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="judge-loop", daemon=True).start()
        return _loop


def submit(coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
    """Schedule ``coro`` on the shared loop and return at once."""
    return asyncio.run_coroutine_threadsafe(coro, _get_loop())


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the shared loop and wait for its result."""
    return submit(coro).result()
