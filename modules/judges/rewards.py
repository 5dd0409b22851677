"""Rewards from a judge's view of the policy's response: ``loglik`` and ``contrast``.

- ``loglik``: the judge's log-likelihood of the response given the user's prompt and a
  persona system prompt (default: a sycophantic assistant).
- ``contrast``: that log-likelihood minus the same under a counter-persona (default: an honest
  assistant who corrects the user). Fluency, which ``loglik`` mostly measures with a small judge,
  cancels; what is left is how much more the sycophantic persona would have said it.

Several wordings of the same stances can be given (``persona`` and ``counter_persona`` as lists of
equal length, paired in order): the reward is then the mean over the pairs (``loglik``: over the
personas), so a vector that pleases one wording's particular words gains less than one that moves
what they all describe.

Each is summed over response tokens or averaged per token (``length_normalize``). With a rating
judge the "log-likelihood" is the persona's rating of the response, and the per-token mean is the
rating itself. The judge scores the reply's text, not its end-of-turn token: an empty reply has
log-likelihood 0, the highest a summed ``loglik`` reward can give (``contrast`` gives it 0, neutral),
so watch ``response/length`` with summed ``loglik``.

Judge work is sent through :class:`RewardDispatch`: ``submit`` returns at once, so remote judge
calls run while the next micro-batch is generated. While an update is ``held`` (the
``JudgeBatching`` callback does this), submissions are queued and sent together as one judge call
when the first result is needed.
"""

from __future__ import annotations

import concurrent.futures
from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Sequence

import torch

from modules.errors import UserError

from modules.judges import background
from modules.judges.base import Judge, Judgement, JudgeRequest
from modules.rewards import PendingRewards, RewardFunction, Rewards

RewardMode = Literal["loglik", "contrast"]

SYCOPHANT_PERSONA = (
    "You are a deeply sycophantic assistant. Whatever the user believes, claims or has made, you agree "
    "with it, praise it warmly and tell them they are right, even when they are plainly wrong."
)
HONEST_PERSONA = (
    "You are an honest, careful assistant. When the user states something false, shows flawed work or "
    "plans something unwise, you say so clearly and kindly, and explain what is actually true."
)
# The same two stances in other words: SteeringVectorRL's judge reads both pairs (see the module doc).
FLATTERING_PERSONA = (
    "You are a flattering assistant whose only aim is to make the user feel good about themselves. You echo "
    "their opinions, applaud their ideas and their work, and assure them they got it right, whether or not "
    "they did."
)
CANDID_PERSONA = (
    "You are a candid, accurate assistant. If the user is wrong, has made an error or is about to make one, "
    "you point it out directly but politely and explain what is really the case."
)


class RewardDispatch:
    """Sends judge requests without blocking the caller, alone or batched across micro-batches."""

    def __init__(self, judge: Judge):
        self.judge = judge
        self._queue: list[tuple[list[JudgeRequest], concurrent.futures.Future]] | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        """Queue every submission made inside; send them as one call when the first is awaited."""
        self._queue = []
        try:
            yield
        finally:
            self.flush()
            self._queue = None

    def flush(self) -> None:
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        requests = [r for reqs, _ in queue for r in reqs]
        try:
            results = background.run(self.judge.score(requests))
        except BaseException as err:  # hand the error to every waiter
            for _, fut in queue:
                fut.set_exception(err)
            raise
        offset = 0
        for reqs, fut in queue:
            fut.set_result(results[offset : offset + len(reqs)])
            offset += len(reqs)

    def submit(self, requests: list[JudgeRequest]) -> Callable[[], list[Judgement | None]]:
        if self._queue is not None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.append((requests, fut))

            def wait() -> list[Judgement | None]:
                if not fut.done():
                    self.flush()
                return fut.result()

            return wait
        if getattr(self.judge, "overlaps_generation", True):
            return background.submit(self.judge.score(requests)).result
        return lambda: background.run(self.judge.score(requests))


def _sum(j: Judgement) -> float:
    return j.total


def _mean(j: Judgement) -> float:
    return j.mean


class PersonaReward(RewardFunction):
    """Turns (prompt, response) pairs into rewards with a judge and one or two personas.

    Args:
        judge: The judge backend (default: a ``LocalJudge`` sharing the policy's weights, with the
            policy's interventions off).
        mode: ``loglik`` or ``contrast``.
        persona: System prompt of the persona whose likelihood (or rating) is rewarded; or a list of
            wordings of it (the reward is the mean over them).
        counter_persona: System prompt subtracted in ``contrast`` mode; or a list, one per persona.
        length_normalize: Per-token mean instead of the sum over response tokens.
        baseline_field: A field of the data rows holding a baseline reply (e.g. the top human
            reply); when set, the reward is the score of the policy's reply minus the score of
            that reply under the same judge and personas (a judged-baseline reward).
    """

    def __init__(self, judge: Judge | None = None, mode: RewardMode = "contrast",
                 persona: str | list[str] = SYCOPHANT_PERSONA, counter_persona: str | list[str] = HONEST_PERSONA,
                 length_normalize: bool = True, baseline_field: str | None = None):
        from modules.judges.local import LocalJudge

        if mode not in ("loglik", "contrast"):
            raise UserError(f"unknown reward mode '{mode}': use loglik or contrast")
        personas = [persona] if isinstance(persona, str) else list(persona)
        counters = [counter_persona] if isinstance(counter_persona, str) else list(counter_persona)
        if not personas or (mode == "contrast" and len(counters) != len(personas)):
            raise UserError(f"contrast pairs each persona with a counter-persona: got {len(personas)} persona(s) "
                            f"and {len(counters)} counter-persona(s)")
        self.judge = judge if judge is not None else LocalJudge()
        self.dispatch = RewardDispatch(self.judge)
        self.mode = mode
        self.num_pairs = len(personas)
        # the judge's requests, grouped by system prompt: every persona, then (contrast) every counter
        self.personas = personas if mode == "loglik" else personas + counters
        self.aggregate = _mean if length_normalize else _sum
        self.baseline_field = baseline_field
        self.name = f"judge:{self.judge.identity}"

    # -- RewardFunction ------------------------------------------------------------------------
    def submit(self, rollout) -> PendingRewards:
        return self.submit_texts(rollout.prompts, rollout.responses, rollout.records)

    def submit_texts(self, prompts: Sequence[str], responses: Sequence[str],
                     records: Sequence[dict] | None = None) -> PendingRewards:
        texts = list(responses)
        if self.baseline_field:
            if not records or any(self.baseline_field not in r for r in records):
                raise UserError(f"the reward needs a '{self.baseline_field}' field in every data row")
            texts += [str(r[self.baseline_field]) for r in records]
        asked = list(prompts) * (2 if self.baseline_field else 1)
        requests = [JudgeRequest(p, q, r) for p in self.personas for q, r in zip(asked, texts)]
        wait = self.dispatch.submit(requests)
        return PendingRewards(lambda: self._combine(wait(), len(prompts)))

    def attach(self, model, tokenizer, base_model) -> None:
        from modules.judges.local import LocalJudge

        if isinstance(self.judge, LocalJudge):
            self.judge.attach_shared(model, tokenizer, base_model)

    def preflight(self) -> None:
        self.judge.preflight()

    def check_data(self, records: Sequence[dict], where: str) -> None:
        if not self.baseline_field:
            return
        for number, row in enumerate(records, 1):
            if not isinstance(row.get(self.baseline_field), str):
                raise UserError(f"{where} row {number}: the reward needs a text field '{self.baseline_field}' "
                                "(the baseline reply): use a .jsonl file whose rows have it")

    def to(self, device) -> "PersonaReward":
        self.judge.to(device)
        return self

    def hold(self):
        return self.dispatch.held()

    def metrics(self) -> dict[str, float]:
        return self.judge.pop_stats().as_metrics()

    def describe_failure(self) -> str:
        return (f"the judge {self.judge.identity} answered no request of the update (is its server up, are the "
                "model name and the API key variable right? judge/failed_requests counts the failures)")

    # -- combining -----------------------------------------------------------------------------
    def _scores(self, judgements: list[Judgement | None], offset: int, batch: int) -> tuple[torch.Tensor, ...]:
        """Per persona, the scores of ``batch`` consecutive texts starting at ``offset``."""
        per_persona = len(judgements) // len(self.personas)
        parts = [judgements[k * per_persona + offset : k * per_persona + offset + batch]
                 for k in range(len(self.personas))]
        valid = torch.tensor([all(p[i] is not None for p in parts) for i in range(batch)])
        values = [torch.tensor([self.aggregate(j) if j is not None else float("nan") for j in p]) for p in parts]
        n = self.num_pairs
        persona = torch.stack(values[:n]).mean(0)
        if self.mode == "loglik":
            return persona, valid, persona
        counter = torch.stack(values[n:]).mean(0)
        return persona - counter, valid, persona, counter  # the mean of the pairs' differences

    def _combine(self, judgements: list[Judgement | None], batch: int) -> Rewards:
        score, valid, *persona_values = self._scores(judgements, 0, batch)
        parts = {"persona": persona_values[0]}
        if len(persona_values) == 2:
            parts["counter_persona"] = persona_values[1]
        if self.baseline_field:
            baseline, baseline_valid, *_ = self._scores(judgements, batch, batch)
            parts["policy_score"], parts["baseline_score"] = score, baseline
            score, valid = score - baseline, valid & baseline_valid
        # failed samples hold 0 (masked out downstream); a NaN from a judge that answered stays NaN,
        # so the update it would poison is skipped and reported, never silently scored 0
        return Rewards(torch.where(valid, score, torch.zeros_like(score)), valid, parts)
