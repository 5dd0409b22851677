"""The oracle's reward against hand values, the informativeness judges, and calibration metrics."""

from __future__ import annotations

import math

import pytest
import torch

from modules.judges.base import Judge, Judgement
from modules.oracle import calibration as cal
from modules.oracle.judges import (InformativenessItem, LLMInformativenessJudge, TokenF1Judge, expected_digit,
                                   token_f1)
from modules.oracle.reward import OracleReward, calibrated_reward
from modules.rollout import Rollout

RECORDS = [
    {"context": "c1", "question": "What topic?", "answer": "sports", "aliases": ["football"]},
    {"context": "c2", "question": "Which city?", "answer": "New York"},
    {"context": "c3", "question": "What animal?", "answer": "dog"},
    {"context": "c4", "question": "Feeling?", "answer": "positive"},
]


def _rollout(responses, records=RECORDS):
    n = len(responses)
    return Rollout(prompts=["p"] * n, prompt_ids=torch.zeros(n, 1, dtype=torch.long),
                   prompt_mask=torch.ones(n, 1, dtype=torch.long), response_ids=torch.zeros(n, 1, dtype=torch.long),
                   response_mask=torch.ones(n, 1, dtype=torch.long), responses=list(responses),
                   records=list(records[:n]))


def test_token_f1_by_hand():
    assert token_f1("sports", "sports") == 1.0
    assert token_f1("The text is about sports.", "sports") == pytest.approx(0.4)  # P 1/4, R 1
    assert token_f1("new york city", "New York") == pytest.approx(0.8)  # P 2/3, R 1
    assert token_f1("the", "sports") == 0.0 and token_f1("", "sports") == 0.0
    assert TokenF1Judge().submit([InformativenessItem("q", "Football!", ("sports", "football"))])() == [1.0]


def test_rows_without_question_or_answer_are_refused():
    from modules.errors import UserError

    OracleReward().check_data(RECORDS, "train data")
    with pytest.raises(UserError, match="train data row 2: the oracle reward needs 'answer'"):
        OracleReward().check_data([RECORDS[0], {"question": "q"}], "train data")


def test_reward_by_hand():
    assert calibrated_reward(torch.tensor([1.0, 0.4, 0.0]), torch.tensor([10.0, 5.0, 8.0]), 2.0).tolist() == \
        pytest.approx([1.0, 0.4 - 2 * 0.01, -2 * 0.64])
    reward = OracleReward(TokenF1Judge(), calibration_weight=1.0, parse_failure_penalty=-1.5)
    out = reward.score(_rollout([
        "[epistemic status: 9] football",        # i = 1, X/10 = .9 -> 1 - .01
        "[epistemic status: 2] new york city",  # i = .8, X/10 = .2 -> .8 - .36
        "The dog.",                              # parse failure -> penalty
        "[epistemic status: 0] negative",        # i = 0, X = 0 -> 0
    ]))
    assert out.values.tolist() == pytest.approx([0.99, 0.44, -1.5, 0.0])
    assert out.valid.tolist() == [True, True, True, True]  # a parse failure is a valid, penalised sample
    assert out.parts["parse_failure"].tolist() == [0, 0, 1, 0]
    assert out.parts["informativeness"].tolist() == pytest.approx([1.0, 0.8, 0.0, 0.0])
    assert out.parts["confidence"].tolist() == pytest.approx([0.9, 0.2, 0.0, 0.0])
    assert out.parts["calibration_error"].tolist() == pytest.approx([0.01, 0.36, 0.0, 0.0])
    assert out.features["parsed"].tolist() == [1, 1, 0, 1]
    metrics = reward.metrics()
    assert metrics["oracle/parse_failures"] == 1 and metrics["oracle/parse_failure/no_tag"] == 1
    assert metrics["oracle/parse_failure_rate"] == 0.25
    assert metrics["oracle/brier"] == pytest.approx((0.01 + 0.36 + 0.0) / 3)
    assert metrics["oracle/mean_confidence"] == pytest.approx(1.1 / 3)
    assert reward.metrics()["oracle/parse_failures"] == 0  # counters reset


class RatingJudge(Judge):
    """A rating judge: 9 when the reply contains the reference, 3 otherwise; None for 'fail'."""

    kind = "rating"

    def __init__(self):
        super().__init__()
        self.calls = 0

    @property
    def identity(self):
        return "rating-fake"

    async def _score_uncached(self, requests):
        self.calls += 1
        out = []
        for r in requests:
            if "fail" in r.response:
                out.append(None)
            else:
                ref = r.prompt.split("Reference answer: ")[1].split("\n")[0]
                out.append(Judgement(9.0 if ref.split(" / ")[0].lower() in r.response.lower() else 3.0, 1))
        return out


def test_llm_judge_rating_mode_masks_failures_and_caches():
    judge = RatingJudge()
    reward = OracleReward(LLMInformativenessJudge(judge), calibration_weight=1.0)
    responses = ["[epistemic status: 10] sports", "[epistemic status: 5] fail", "nope", "[epistemic status: 3] x"]
    out = reward.score(_rollout(responses))
    assert out.valid.tolist() == [True, False, True, True]  # the judge failure is masked, never 0
    assert out.values[0].item() == pytest.approx(1.0)
    assert out.values[3].item() == pytest.approx(1 / 3 - (0.3 - 1 / 3) ** 2)
    assert out.values[2].item() == -1.0
    reward.score(_rollout(responses))  # the same requests again: answered from the cache
    metrics = reward.metrics()
    assert metrics["judge/cache_hits"] >= 2 and metrics["judge/failed_requests"] == 2
    assert judge.calls == 2  # the failed request is retried on the second call, the rest are cached


class DigitLoglikJudge(Judge):
    """A log-likelihood judge whose log-prob of digit d is -|d - 6|."""

    kind = "loglik"

    @property
    def identity(self):
        return "digits"

    async def _score_uncached(self, requests):
        return [Judgement(-abs(int(r.response) - 6), 1) for r in requests]


def test_llm_judge_loglik_mode_scores_ten_digits():
    llm = LLMInformativenessJudge(DigitLoglikJudge())
    scores = llm.submit([InformativenessItem("q", "a", ("r",))])()
    weights = [math.exp(-abs(d - 6)) for d in range(10)]
    expected = sum(d * w for d, w in enumerate(weights)) / sum(weights) / 9
    assert scores[0] == pytest.approx(expected)
    assert expected_digit([0.0] * 10) == pytest.approx(4.5)


def test_llm_judge_through_openai_rating_mode():
    from modules.judges.openai_compat import OpenAICompatibleJudge
    from tests.openai_server import FakeOpenAIServer

    with FakeOpenAIServer(rater=lambda messages: {"9": math.log(0.5), "5": math.log(0.5)}) as server:
        judge = OpenAICompatibleJudge(base_url=server.base_url, model="judge-model", mode="rating", api_key_env="NONE")
        score = LLMInformativenessJudge(judge).submit([InformativenessItem("Which city?", "Paris", ("Paris",))])()
        judge.close()
        sent = server.requests[-1].body["messages"]
    assert score == [pytest.approx(7 / 9)]
    assert "Reference answer: Paris" in sent[1]["content"] and "Paris" in sent[1]["content"]


def test_calibration_metrics_by_hand(tmp_path):
    conf = [0.0, 0.0, 0.5, 0.5, 1.0]
    inform = [0.0, 0.2, 1.0, 0.0, 1.0]
    assert cal.brier_score(conf, inform) == pytest.approx((0 + 0.04 + 0.25 + 0.25 + 0) / 5)
    summary = cal.calibration_summary(conf, inform, mask=[1, 1, 1, 1, 0])
    assert summary["mean_confidence"] == pytest.approx(0.25)
    assert summary["mean_informativeness"] == pytest.approx(0.3)
    assert summary["count"] == 4
    table = cal.reliability_table(conf, inform)
    assert len(table) == 11 and sum(b.count for b in table) == 5
    assert (table[0].count, table[0].mean_informativeness) == (2, pytest.approx(0.1))
    assert (table[5].count, table[10].count) == (2, 1)
    assert cal.expected_calibration_error(table) == pytest.approx((2 * 0.1 + 2 * 0.0 + 0) / 5)
    assert sum(b.count for b in cal.reliability_table(conf, inform, num_bins=4)) == 5
    assert "ECE" in cal.format_reliability_table(table)
    pytest.importorskip("matplotlib")
    assert cal.reliability_diagram(table, tmp_path / "rel.png")
    assert (tmp_path / "rel.png").stat().st_size > 1000
