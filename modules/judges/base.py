"""The one judge interface that every backend implements.

A judge scores a policy's *given* response (teacher-forced), never text of its own. It is asked
through :meth:`Judge.score`, an ``async`` call over a list of :class:`JudgeRequest`, and answers one
:class:`Judgement` per request, or ``None`` for a request that finally failed (after the backend's
retries). The caller masks failed samples out of the update and counts them; a failure is never
turned into a reward of 0.

Two kinds of judgement exist:

- ``loglik``: ``total`` is the summed log-probability of the response tokens under the judge, given
  the persona system prompt and the user's prompt; ``num_tokens`` is how many tokens were scored.
- ``rating``: ``total`` is the judge's probability-weighted rating of the response, and
  ``num_tokens`` is 1 (so a per-token mean equals the rating itself).

Every judge keeps a response cache (keyed by the whole request) and running counters
(:class:`JudgeStats`) that the training loop logs.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, Sequence

from modules.judges import background

JudgementKind = Literal["loglik", "rating"]


@dataclass(frozen=True)
class JudgeRequest:
    """One response to be scored."""

    system: str
    """The judge's system prompt (a persona, or rating instructions built from one)."""
    prompt: str
    """The user's message that the policy answered."""
    response: str
    """The policy's reply, exactly as generated (decoded without special tokens)."""


@dataclass(frozen=True)
class Judgement:
    """A judge's answer for one request."""

    total: float
    """Summed log-probability of the response tokens (``loglik``), or the expected rating."""
    num_tokens: int
    """Number of response tokens scored (``loglik``); 1 for a rating."""

    @property
    def mean(self) -> float:
        return self.total / max(self.num_tokens, 1)


@dataclass
class JudgeStats:
    """Counters since the last :meth:`Judge.pop_stats` (the loop pops them once per update)."""

    requests: int = 0
    cache_hits: int = 0
    failed: int = 0
    retries: int = 0
    seconds: float = 0.0
    calls: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {
            "judge/requests": float(self.requests),
            "judge/cache_hits": float(self.cache_hits),
            "judge/failed_requests": float(self.failed),
            "judge/retries": float(self.retries),
            "judge/latency_s": self.seconds / max(self.calls, 1),
        }


@dataclass
class _ResponseCache:
    max_items: int
    items: OrderedDict = field(default_factory=OrderedDict)

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key, value: Judgement) -> None:
        if self.max_items <= 0:
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)


RANKS_SHARING_ENDPOINTS = 1
"""Training processes (ranks) that call the same remote judges; set by the training loop."""


def share_endpoints_among(ranks: int) -> None:
    """Split every remote judge's ``max_concurrency`` among ``ranks`` processes (one per rank)."""
    global RANKS_SHARING_ENDPOINTS
    RANKS_SHARING_ENDPOINTS = max(1, int(ranks))


def concurrency_per_rank(limit: int) -> int:
    """This rank's share of a budget of ``limit`` requests in flight (at least one)."""
    return max(1, limit // RANKS_SHARING_ENDPOINTS)


class Judge(ABC):
    """Base class of all judges. Subclasses implement :meth:`_score_uncached`.

    Args:
        cache_size: How many judgements to keep in the in-memory response cache (0 disables it).
    """

    kind: JudgementKind = "loglik"

    def __init__(self, cache_size: int = 50_000) -> None:
        self._cache = _ResponseCache(cache_size)
        self._stats = JudgeStats()

    # -- what subclasses provide ---------------------------------------------------------------
    @property
    @abstractmethod
    def identity(self) -> str:
        """A string naming the judge's model and mode; part of every cache key."""

    @abstractmethod
    async def _score_uncached(self, requests: Sequence[JudgeRequest]) -> list[Judgement | None]:
        """Score requests that missed the cache; ``None`` for one that finally failed."""

    def preflight(self) -> None:
        """Check, before training starts, that the judge can answer; raise ``UserError`` if not."""

    def to(self, device) -> "Judge":
        """Move any local weights to ``device`` (remote judges ignore it)."""
        return self

    def close(self) -> None:
        """Release clients and threads."""

    # -- the public call -----------------------------------------------------------------------
    async def score(self, requests: Sequence[JudgeRequest]) -> list[Judgement | None]:
        """Score ``requests``; answers come back in the same order."""
        start = time.perf_counter()
        keys = [(self.identity, r.system, r.prompt, r.response) for r in requests]
        results: list[Judgement | None] = [self._cache.get(k) for k in keys]
        missing = [i for i, res in enumerate(results) if res is None]
        # identical requests inside one call are scored once
        unique: dict[tuple, int] = {}
        for i in missing:
            unique.setdefault(keys[i], i)
        todo = list(unique.values())
        if todo:
            scored = await self._score_uncached([requests[i] for i in todo])
            by_key = {keys[i]: s for i, s in zip(todo, scored)}
            for i in missing:
                results[i] = by_key[keys[i]]
            for k, s in by_key.items():
                if s is not None:
                    self._cache.put(k, s)
        self._stats.requests += len(requests)
        self._stats.cache_hits += len(requests) - len(missing)
        self._stats.failed += sum(r is None for r in results)
        self._stats.seconds += time.perf_counter() - start
        self._stats.calls += 1
        return results

    def score_blocking(self, requests: Sequence[JudgeRequest]) -> list[Judgement | None]:
        """:meth:`score` for code that is not async (evaluation, the CLI)."""
        return background.run(self.score(requests))

    def pop_stats(self) -> JudgeStats:
        stats, self._stats = self._stats, JudgeStats()
        return stats
