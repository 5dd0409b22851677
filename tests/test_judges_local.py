"""The local judge's exact log-probs, rewards from personas, batching, and remote == local scoring."""

import pytest
import torch
import torch.nn.functional as F

from modules.judges.base import Judge, Judgement, JudgeRequest
from modules.judges.local import LocalJudge
from modules.judges.openai_compat import OpenAICompatibleJudge
from modules.errors import UserError
from modules.judges.rewards import PersonaReward
from modules.models.loading import load_causal_lm
from modules.models.steering import Steering, SteeringVector
from tests.openai_server import FakeOpenAIServer

REQUESTS = [
    JudgeRequest("You flatter everyone.", "Is my plan good?", "Yes, it is brilliant!"),
    JudgeRequest("You are honest.", "Is 2+2=5?", "No. 2 + 2 = 4."),
]


def _manual_logprob(model, tokenizer, request: JudgeRequest) -> tuple[float, int]:
    messages = [{"role": "system", "content": request.system}, {"role": "user", "content": request.prompt}]
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prefix + request.response, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prefix_ids)] == prefix_ids  # the template ends on a clean token boundary
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0].float()
    logp = F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(full_ids[1:])[:, None]).squeeze(-1)
    return float(logp[len(prefix_ids) - 1 :].sum()), len(full_ids) - len(prefix_ids)


def test_local_judge_scores_the_given_response_exactly(tiny_llama_dir):
    judge = LocalJudge(tiny_llama_dir, "float32", batch_size=1)
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    results = judge.score_blocking(REQUESTS)
    for request, result in zip(REQUESTS, results):
        total, count = _manual_logprob(model, tokenizer, request)
        assert result.num_tokens == count
        assert result.total == pytest.approx(total, abs=1e-4)
    # batching (right padding) changes nothing
    batched = LocalJudge(tiny_llama_dir, "float32", batch_size=8).score_blocking(REQUESTS)
    assert [r.total for r in batched] == pytest.approx([r.total for r in results], abs=1e-4)
    assert judge.score_blocking([JudgeRequest("s", "p", "")])[0] == Judgement(0.0, 0)


def test_shared_judge_scores_with_the_steering_off(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    plain = LocalJudge(tiny_llama_dir, "float32").score_blocking(REQUESTS)
    vector = SteeringVector(model.config.hidden_size, alpha_init=5.0)
    with torch.no_grad():
        vector.v.normal_()
    steering = Steering(model, vector, 1)
    shared = LocalJudge()
    shared.attach_shared(model, tokenizer, steering.disabled)
    assert [r.total for r in shared.score_blocking(REQUESTS)] == pytest.approx([r.total for r in plain], abs=1e-4)
    unguarded = LocalJudge()
    unguarded.attach_shared(model, tokenizer, torch.no_grad)  # steering left on: a different score
    assert unguarded.score_blocking(REQUESTS)[0].total != pytest.approx(plain[0].total, abs=1e-3)


class TableJudge(Judge):
    """A judge that looks answers up in a table and counts its calls; None entries fail."""

    def __init__(self, table):
        super().__init__(cache_size=0)
        self.table, self.calls = table, []

    @property
    def identity(self):
        return "table"

    async def _score_uncached(self, requests):
        self.calls.append(len(requests))
        return [self.table[(r.system, r.response)] for r in requests]


def test_reward_modes_hand_values():
    table = {("S", "a"): Judgement(-2.0, 4), ("H", "a"): Judgement(-6.0, 4),
             ("S", "b"): Judgement(-3.0, 1), ("H", "b"): None}
    judge = TableJudge(table)
    contrast_mean = PersonaReward(judge, "contrast", "S", "H", length_normalize=True).submit_texts(["p", "q"], ["a", "b"]).result()
    assert contrast_mean.values[0].item() == pytest.approx((-2.0 / 4) - (-6.0 / 4))
    assert contrast_mean.valid.tolist() == [True, False]  # a failed counter-persona call fails the sample
    contrast_sum = PersonaReward(judge, "contrast", "S", "H", length_normalize=False).submit_texts(["p"], ["a"]).result()
    assert contrast_sum.values.tolist() == [4.0]
    loglik = PersonaReward(judge, "loglik", "S", "H", length_normalize=False).submit_texts(["p", "q"], ["a", "b"]).result()
    assert loglik.values.tolist() == [-2.0, -3.0] and loglik.valid.tolist() == [True, True]
    assert judge.pop_stats().failed == 1


def test_several_persona_wordings_average_their_pairs():
    table = {("S1", "a"): Judgement(-2.0, 2), ("H1", "a"): Judgement(-6.0, 2),
             ("S2", "a"): Judgement(-1.0, 2), ("H2", "a"): Judgement(-1.0, 2),
             ("S1", "b"): Judgement(-3.0, 1), ("H1", "b"): Judgement(-3.0, 1),
             ("S2", "b"): Judgement(-1.0, 1), ("H2", "b"): None}
    reward = PersonaReward(TableJudge(table), "contrast", ["S1", "S2"], ["H1", "H2"], length_normalize=True)
    rewards = reward.submit_texts(["p", "q"], ["a", "b"]).result()
    # pair 1: -1 - -3 = +2; pair 2: -0.5 - -0.5 = 0; the mean of the pairs: +1
    assert rewards.values[0].item() == pytest.approx(1.0)
    assert rewards.parts["persona"][0].item() == pytest.approx((-1.0 + -0.5) / 2)
    assert rewards.parts["counter_persona"][0].item() == pytest.approx((-3.0 + -0.5) / 2)
    assert rewards.valid.tolist() == [True, False]  # one failed wording fails the sample
    loglik = PersonaReward(TableJudge(table), "loglik", ["S1", "S2"], length_normalize=False)
    assert loglik.submit_texts(["p"], ["a"]).result().values.tolist() == [pytest.approx(-1.5)]
    with pytest.raises(UserError, match="2 persona\\(s\\) and 1 counter"):
        PersonaReward(TableJudge(table), "contrast", ["S1", "S2"], "H1")


def test_baseline_reply_is_scored_and_subtracted():
    """The judged-baseline reward: the policy reply's score minus the data row's baseline reply's score."""
    table = {("H", "mine"): Judgement(-2.0, 2), ("S", "mine"): Judgement(-4.0, 2),
             ("H", "theirs"): Judgement(-3.0, 1), ("S", "theirs"): Judgement(-1.0, 1),
             ("H", "bad"): Judgement(-1.0, 1), ("S", "bad"): None}
    reward = PersonaReward(TableJudge(table), "contrast", "H", "S", length_normalize=True, baseline_field="top_reply")
    rewards = reward.submit_texts(["p", "q"], ["mine", "mine"], [{"top_reply": "theirs"}, {"top_reply": "bad"}]).result()
    assert rewards.values[0].item() == pytest.approx((-1.0 - -2.0) - (-3.0 - -1.0))  # (+1) - (-2)
    assert rewards.valid.tolist() == [True, False]  # a failed baseline score fails the sample
    assert rewards.parts["baseline_score"][0].item() == pytest.approx(-2.0)
    with pytest.raises(UserError, match="top_reply"):
        reward.submit_texts(["p"], ["mine"], [{"other": "x"}])


def test_held_dispatch_sends_one_call_for_all_micro_batches():
    table = {("S", r): Judgement(-1.0, 1) for r in "abcd"} | {("H", r): Judgement(-2.0, 1) for r in "abcd"}
    judge = TableJudge(table)
    reward = PersonaReward(judge, "contrast", "S", "H", length_normalize=False)
    with reward.dispatch.held():
        first = reward.submit_texts(["p", "p"], ["a", "b"])
        second = reward.submit_texts(["p", "p"], ["c", "d"])
        assert judge.calls == []  # nothing sent yet
        assert first.result().values.tolist() == [1.0, 1.0]
        assert second.result().values.tolist() == [1.0, 1.0]
    assert judge.calls == [8]
    reward.submit_texts(["p"], ["a"]).result()
    assert judge.calls == [8, 2]  # outside the hold each micro-batch is its own call


def _model_scorer(model, tokenizer):
    """A completions scorer backed by a real model (what a vLLM server computes)."""

    def score(text):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        starts = [s for s, _ in spans]
        tokens = [text[s : (starts[i + 1] if i + 1 < len(starts) else len(text))] for i, s in enumerate(starts)]
        tokens[0] = text[: starts[1]] if len(starts) > 1 else text
        starts[0] = 0
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logp = F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        return tokens, starts, [0.0] + logp.tolist()

    return score


def test_remote_echo_judge_equals_the_local_judge(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    local = LocalJudge(tiny_llama_dir, "float32").score_blocking(REQUESTS)
    with FakeOpenAIServer(scorer=_model_scorer(model, tokenizer)) as server:
        remote = OpenAICompatibleJudge(server.base_url, "tiny", mode="echo", prompt_format=tiny_llama_dir,
                                       alignment_check=False, max_retries=0)
        results = remote.score_blocking(REQUESTS)
        remote.close()
    for a, b in zip(local, results):
        assert a.num_tokens == b.num_tokens
        assert a.total == pytest.approx(b.total, abs=1e-3)
