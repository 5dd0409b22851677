"""Informativeness judges: how right and informative an oracle's answer is, in [0, 1].

Two kinds, behind one small interface (:class:`InformativenessJudge`; ``submit`` returns at once and
the returned callable waits, so remote judges run while the next micro-batch is generated):

- :class:`TokenF1Judge` (deterministic, CPU, the embedded default): the SQuAD-style token F1 between
  the answer and each reference answer (the row's ``answer`` and its ``aliases``), the best of them.
  Exactly: both texts are lower-cased, ASCII punctuation is removed, the articles ``a``, ``an``,
  ``the`` are dropped, and the rest is split on whitespace; with ``c`` the size of the multiset
  intersection of the two token lists, precision ``c / len(answer)``, recall
  ``c / len(reference)``, ``F1 = 2 P R / (P + R)`` (0 when ``c = 0`` or either list is empty).
  "sports" against "sports" is 1; "The text is about sports." against "sports" is 2·(1/4)·1/(1/4+1)
  = 0.4 (tokens text/is/about/sports); "football" against the alias "football" is 1.
- :class:`LLMInformativenessJudge`: an LLM rates the answer 0-9 against the question and the
  reference, through any :class:`modules.judges.base.Judge` backend (batched, cached, retried;
  a failed request masks the sample). With a ``rating`` judge (``OpenAICompatibleJudge`` in
  ``mode="rating"``) the rating is the probability-weighted digit the server returns. With a
  ``loglik`` judge (``LocalJudge``, or an OpenAI-compatible server in ``echo`` mode) each of the ten
  digits is scored as the judge's reply to the rating request, and the rating is the expectation
  under the softmax of those ten log-likelihoods. Informativeness = rating / 9.

Where we depart from the Activation Oracles recipe (arXiv 2512.15674): 1. a deterministic judge is the default (CPU, no key); 2. the LLM
judge's prompt and its 0-9 scale are ours (the seed's judge prompt is not reused) and go through the
project's judge backends, so a local model can be the judge by log-likelihood of the digits.
"""

from __future__ import annotations

import math
import re
import string
from abc import ABC, abstractmethod
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

from modules.judges.base import Judge, Judgement, JudgeRequest
from modules.judges.rewards import RewardDispatch


@dataclass(frozen=True)
class InformativenessItem:
    """One answer to be judged."""

    question: str
    answer: str
    """The oracle's answer (the text after the epistemic-status tag)."""
    references: tuple[str, ...]
    """Answers that count as right: the row's ``answer`` first, then its aliases."""
    context: str = ""
    """The text the subject read (an LLM judge may be shown it; the oracle never is)."""


class InformativenessJudge(ABC):
    """Scores answers in [0, 1]; None for an answer that could not be scored (masked, never 0)."""

    name: str = "informativeness"

    @abstractmethod
    def submit(self, items: list[InformativenessItem]) -> Callable[[], list[float | None]]:
        """Start scoring; return a callable that waits for the scores."""

    def attach(self, model, tokenizer, base_model: Callable[[], ContextManager]) -> None:
        """Offered the policy's model and a context with every adapter off (a shared local judge)."""

    def preflight(self) -> None:
        """Check that scores can be computed; raise UserError if not."""

    def to(self, device) -> "InformativenessJudge":
        return self

    def hold(self) -> ContextManager:
        """Context inside which submissions may be batched into one call."""
        return nullcontext()

    def metrics(self) -> dict[str, float]:
        return {}


# -- deterministic -------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def answer_tokens(text: str) -> list[str]:
    """Lower-case, drop ASCII punctuation and the articles a/an/the, split on whitespace."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style token F1 (see the module docstring)."""
    pred, ref = answer_tokens(answer), answer_tokens(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_token_f1(answer: str, references: tuple[str, ...] | list[str]) -> float:
    return max((token_f1(answer, r) for r in references), default=0.0)


class TokenF1Judge(InformativenessJudge):
    """Informativeness = the best token F1 of the answer against the reference answers."""

    name = "token_f1"

    def submit(self, items: list[InformativenessItem]) -> Callable[[], list[float | None]]:
        scores: list[float | None] = [best_token_f1(i.answer, i.references) for i in items]
        return lambda: scores


# -- LLM -------------------------------------------------------------------------------------------
INFORMATIVENESS_SYSTEM = (
    "You grade short answers to questions about a hidden text. You see the question, the reference "
    "answer and the answer to grade. A correct and specific answer (the same meaning as the reference) "
    "deserves 9; a partly right or vague answer something in between; a wrong, empty or evasive answer 0."
)
"""Default system prompt of the LLM informativeness judge (configurable)."""
INFORMATIVENESS_TEMPLATE = (
    "Question: {question}\nReference answer: {reference}\nAnswer to grade: {answer}\n\n"
    "How informative and correct is the answer to grade? Reply with one digit from 0 to 9."
)
"""Default user message; placeholders {question}, {reference}, {answer}, {context}."""
_DIGITS = [str(d) for d in range(10)]


def expected_digit(logliks: list[float]) -> float:
    """The expected digit under the softmax of the ten digits' log-likelihoods."""
    top = max(logliks)
    weights = [math.exp(v - top) for v in logliks]
    return sum(d * w for d, w in enumerate(weights)) / sum(weights)


class LLMInformativenessJudge(InformativenessJudge):
    """An LLM rates each answer 0-9 through a :class:`~modules.judges.base.Judge` backend.

    Args:
        judge: ``OpenAICompatibleJudge`` (``rating`` or ``echo`` mode) or ``LocalJudge`` (``model:
            null`` shares the policy's weights with every adapter off).
        system_prompt: The grader's instructions.
        template: The user message, with {question}, {reference}, {answer}, {context}.
    """

    def __init__(self, judge: Judge, system_prompt: str = INFORMATIVENESS_SYSTEM,
                 template: str = INFORMATIVENESS_TEMPLATE):
        self.judge, self.system_prompt, self.template = judge, system_prompt, template
        self.name = f"llm:{judge.identity}"
        self.dispatch = RewardDispatch(judge)

    def _text(self, item: InformativenessItem, answer: str) -> str:
        return self.template.format(question=item.question, reference=" / ".join(item.references),
                                    answer=answer, context=item.context)

    def _requests(self, item: InformativenessItem) -> list[JudgeRequest]:
        if self.judge.kind == "rating":
            # the backend shows prompt and reply and asks for a digit; the answer is the reply
            return [JudgeRequest(self.system_prompt, self._text(item, "(the reply below)"), item.answer)]
        return [JudgeRequest(self.system_prompt, self._text(item, item.answer), d) for d in _DIGITS]

    def _score(self, judgements: list[Judgement | None]) -> float | None:
        if any(j is None for j in judgements):
            return None
        if self.judge.kind == "rating":
            return min(max(judgements[0].total / 9.0, 0.0), 1.0)
        return expected_digit([j.total for j in judgements]) / 9.0

    def submit(self, items: list[InformativenessItem]) -> Callable[[], list[float | None]]:
        per_item = [self._requests(i) for i in items]
        wait = self.dispatch.submit([r for reqs in per_item for r in reqs])

        def result() -> list[float | None]:
            judgements, out, offset = wait(), [], 0
            for reqs in per_item:
                out.append(self._score(judgements[offset : offset + len(reqs)]))
                offset += len(reqs)
            return out

        return result

    def attach(self, model, tokenizer, base_model) -> None:
        if hasattr(self.judge, "attach_shared"):
            self.judge.attach_shared(model, tokenizer, base_model)

    def preflight(self) -> None:
        self.judge.preflight()

    def to(self, device) -> "LLMInformativenessJudge":
        self.judge.to(device)
        return self

    def hold(self) -> ContextManager:
        return self.dispatch.held()

    def metrics(self) -> dict[str, float]:
        return self.judge.pop_stats().as_metrics()
