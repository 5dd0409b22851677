"""OpenAICompatibleJudge against a local fake OpenAI server, through the real ``openai`` client."""

from __future__ import annotations

import logging
import pickle
import time

import openai
import pytest

from modules.errors import UserError
from modules.judges.base import JudgeRequest
from modules.judges.chat_format import render_judge_prefix
from modules.judges.openai_compat import RATING_INSTRUCTIONS, OpenAICompatibleJudge
from tests.openai_server import FakeOpenAIServer, shifted_scorer, toy_scorer
from tests.helpers import free_port

# Pieces "Hello " "friend, " "nice " "day." score -0.5 per character under the toy scorer.
REQ = JudgeRequest(system="Be kind.", prompt="Hi there", response="Hello friend, nice day.")
REQ_TOTAL, REQ_TOKENS = -0.5 * (6 + 8 + 5 + 4), 4
RATING = (7 * 0.6 + 8 * (0.15 + 0.05) + 3 * 0.1) / 0.9  # digits renormalised; "The" ignored


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Shrink the client's and our own retry pauses so that retry tests take milliseconds."""
    monkeypatch.setattr(openai._base_client, "INITIAL_RETRY_DELAY", 0.01)
    monkeypatch.setattr(OpenAICompatibleJudge, "_garbage_backoff_s", 0.01)


@pytest.fixture
def srv():
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def make_judge():
    made: list[OpenAICompatibleJudge] = []

    def make(server: FakeOpenAIServer, **kwargs) -> OpenAICompatibleJudge:
        kwargs = {"timeout_s": 2.0, "max_retries": 2, **kwargs}
        made.append(OpenAICompatibleJudge(base_url=server.base_url, model="judge-model", **kwargs))
        return made[-1]

    yield make
    for judge in made:
        judge.close()


# -- chat_format ---------------------------------------------------------------------------------
def test_builtin_formats():
    assert render_judge_prefix("S", "U", "chatml") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert render_judge_prefix("S", "U", "llama3") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_judge_prefix("S", "U", "mistral") == "<s>[INST] S\n\nU [/INST]"
    assert render_judge_prefix("", "U", "chatml") == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_folder_format(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"?": 0}, unk_token="?")),
                                  unk_token="?")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(tmp_path)
    assert render_judge_prefix("S", "U", str(tmp_path)) == "<system>S\n<user>U\n<assistant>"
    with pytest.raises(UserError, match="neither a built-in format"):
        render_judge_prefix("S", "U", str(tmp_path / "missing"))


# -- echo mode -----------------------------------------------------------------------------------
def test_echo_scores_exactly_the_response_span(srv, make_judge):
    judge = make_judge(srv)
    [j] = judge.score_blocking([REQ])
    assert j.total == pytest.approx(REQ_TOTAL) and j.num_tokens == REQ_TOKENS
    body = srv.posts("/completions")[0].body
    assert body["prompt"] == render_judge_prefix(REQ.system, REQ.prompt, "chatml") + REQ.response
    assert body["echo"] is True and body["logprobs"] == 1
    assert body["max_tokens"] == 1 and body["temperature"] == 0


def test_echo_span_survives_a_server_added_bos(make_judge):
    """A server that prepends its own BOS shifts every offset; the span is anchored at the end."""
    def bos_scorer(text):
        tokens, offsets, values = toy_scorer(text)
        return ["<s>", *tokens], [0, *(o + 3 for o in offsets)], [-1.0, *values]

    with FakeOpenAIServer(scorer=bos_scorer) as server:
        judge = make_judge(server, prompt_format="llama3")
        [j] = judge.score_blocking([REQ])
        assert j.total == pytest.approx(REQ_TOTAL) and j.num_tokens == REQ_TOKENS
        judge.preflight()  # aligned, only warns about the extra characters


def test_preflight_passes_on_an_aligned_server(srv, make_judge):
    make_judge(srv).preflight()
    make_judge(srv, mode="rating").preflight()


def test_preflight_rejects_shifted_logprobs(make_judge):
    with FakeOpenAIServer(scorer=shifted_scorer) as server:
        with pytest.raises(UserError, match="misaligned"):
            make_judge(server).preflight()
        make_judge(server, alignment_check=False).preflight()  # the user's override


def test_preflight_rejects_a_server_without_prompt_logprobs(make_judge):
    class NoEcho(FakeOpenAIServer):  # like llama.cpp's server: only the generated token comes back
        def _completion(self, body):
            return super()._completion({**body, "echo": False})

    with NoEcho() as server, pytest.raises(UserError, match="mode=rating"):
        make_judge(server).preflight()


# -- rating mode ---------------------------------------------------------------------------------
def test_rating_is_the_probability_weighted_digit(srv, make_judge):
    judge = make_judge(srv, mode="rating")
    assert judge.kind == "rating" and OpenAICompatibleJudge.kind == "loglik"
    [j] = judge.score_blocking([REQ])
    assert j.total == pytest.approx(RATING) and j.num_tokens == 1
    body = srv.posts("/chat/completions")[0].body
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    system, user = body["messages"]
    assert system["content"].startswith(REQ.system) and RATING_INSTRUCTIONS in system["content"]
    assert REQ.prompt in user["content"] and REQ.response in user["content"]
    assert judge.parsed_fallbacks == 0


def test_rating_falls_back_to_the_generated_digit(make_judge):
    with FakeOpenAIServer(chat_logprobs=False) as server:
        judge = make_judge(server, mode="rating")
        assert judge.score_blocking([REQ])[0].total == 7.0
        assert judge.parsed_fallbacks == 1
    with FakeOpenAIServer(rater=lambda messages: {"Sure": -0.1, "No": -2.0}) as server:
        judge = make_judge(server, mode="rating", garbage_retries=0)
        assert judge.score_blocking([REQ]) == [None]


# -- failures and retries ------------------------------------------------------------------------
@pytest.mark.parametrize("status", [429, 500])
def test_http_error_then_success(srv, make_judge, status):
    judge = make_judge(srv)
    srv.fail_next(1, status=status)
    [j] = judge.score_blocking([REQ])
    assert j.total == pytest.approx(REQ_TOTAL)
    assert len(srv.posts()) == 2 and judge.pop_stats().retries == 1


def test_timeout_then_success(srv, make_judge):
    judge = make_judge(srv, timeout_s=0.3)
    srv.hang_next(1, seconds=1.0)
    [j] = judge.score_blocking([REQ])
    assert j.total == pytest.approx(REQ_TOTAL) and len(srv.posts()) == 2


@pytest.mark.parametrize("body", ["json", "text"])
def test_garbage_then_success(srv, make_judge, body):
    judge = make_judge(srv)
    srv.garbage_next(1, body=body)
    [j] = judge.score_blocking([REQ])
    assert j.total == pytest.approx(REQ_TOTAL)
    assert len(srv.posts()) == 2 and judge.pop_stats().retries == 1


def test_garbage_until_retries_run_out(srv, make_judge):
    judge = make_judge(srv, garbage_retries=2)
    srv.garbage_next(3)
    assert judge.score_blocking([REQ]) == [None]
    assert len(srv.posts()) == 3


def test_permanent_failure_drops_only_that_request(srv, make_judge, caplog):
    judge = make_judge(srv, max_retries=1)
    srv.always_fail(status=500, when="Doomed")
    requests = [REQ, JudgeRequest("Be kind.", "Doomed prompt", "Hello friend, nice day."),
                JudgeRequest("Be kind.", "Other", "Hello friend, nice day.")]
    with caplog.at_level(logging.WARNING, logger="modules.judges.openai_compat"):
        results = judge.score_blocking(requests)
    assert results[1] is None
    assert [r.total for r in (results[0], results[2])] == pytest.approx([REQ_TOTAL, REQ_TOTAL])
    assert judge.pop_stats().failed == 1  # counted by the base class
    warnings = [r for r in caplog.records if r.name == "modules.judges.openai_compat"]
    assert len(warnings) == 1 and "HTTP 500" in warnings[0].getMessage()


# -- preflight -----------------------------------------------------------------------------------
def test_preflight_nothing_listening():
    judge = OpenAICompatibleJudge(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m")
    start = time.perf_counter()
    with pytest.raises(UserError, match="did not answer"):
        judge.preflight()
    assert time.perf_counter() - start < 5


def test_preflight_remote_url_needs_the_key_variable(monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)

    def no_client(*args, **kwargs):
        raise AssertionError("no request may be sent")

    monkeypatch.setattr(openai, "AsyncOpenAI", no_client)
    judge = OpenAICompatibleJudge(base_url="https://judge.example/v1", model="m",
                                  api_key_env="JUDGE_TEST_KEY")
    with pytest.raises(UserError, match="export JUDGE_TEST_KEY="):
        judge.preflight()


@pytest.mark.parametrize("status, message", [(401, "refused the API key"), (404, "rejected"),
                                             (503, "did not answer")])
def test_preflight_http_errors(srv, make_judge, status, message):
    srv.always_fail(status=status)
    with pytest.raises(UserError, match=message):
        make_judge(srv).preflight()
    assert len(srv.posts()) == 1  # no retries in preflight


# -- key, cache, concurrency ---------------------------------------------------------------------
def test_key_comes_from_the_env_and_is_never_shown(srv, make_judge, monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("JUDGE_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    judge = make_judge(srv, api_key_env="JUDGE_TEST_KEY", max_retries=1)
    judge.preflight()
    srv.fail_next(1, status=429)
    srv.always_fail(status=401, when="Doomed")
    judge.score_blocking([REQ, JudgeRequest("S", "Doomed", "R")])
    assert srv.posts()[0].headers["authorization"] == f"Bearer {secret}"
    assert secret not in repr(judge) and secret not in str(judge)
    assert secret.encode() not in pickle.dumps(judge)
    assert caplog.records and not any(secret in r.getMessage() for r in caplog.records)


def test_no_key_variable_means_placeholder_key_locally(srv, make_judge, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    make_judge(srv, api_key_env="JUDGE_TEST_KEY").score_blocking([REQ])
    assert srv.posts()[0].headers["authorization"] == "Bearer EMPTY"


def test_cache_sends_one_request(srv, make_judge):
    judge = make_judge(srv)
    first = judge.score_blocking([REQ, REQ])
    second = judge.score_blocking([REQ])
    assert first == [first[0], first[0]] and second == [first[0]]
    assert len(srv.posts()) == 1 and judge.pop_stats().cache_hits == 1


def test_concurrency_is_bounded(make_judge):
    with FakeOpenAIServer(delay_s=0.1) as server:
        judge = make_judge(server, max_concurrency=3)
        requests = [JudgeRequest("S", f"prompt {i}", "Fine words.") for i in range(10)]
        assert all(r is not None for r in judge.score_blocking(requests))
        assert server.max_in_flight == 3


def test_the_concurrency_budget_is_shared_by_the_ranks(make_judge):
    from modules.judges import base

    with FakeOpenAIServer(delay_s=0.1) as server:
        judge = make_judge(server, max_concurrency=6)
        requests = [JudgeRequest("S", f"prompt {i}", "Fine words.") for i in range(12)]
        judge.score_blocking(requests[:1])  # the client and its semaphore exist before the ranks are known
        try:
            base.share_endpoints_among(2)  # what the training loop does on each of 2 ranks
            assert all(r is not None for r in judge.score_blocking(requests[1:]))
            assert server.max_in_flight == 3  # this rank's half of 6
            base.share_endpoints_among(8)
            assert base.concurrency_per_rank(6) == 1  # never none
        finally:
            base.share_endpoints_among(1)


def test_identity_and_pickle(srv, make_judge):
    judge = make_judge(srv, mode="rating", prompt_format="llama3")
    assert judge.identity == f"openai:{srv.base_url}:judge-model:rating:llama3"
    judge.score_blocking([REQ])  # the client now exists
    copy = pickle.loads(pickle.dumps(judge))
    assert copy.identity == judge.identity and copy.kind == "rating"
    assert copy.score_blocking([JudgeRequest("S", "P", "R")])[0].total == pytest.approx(RATING)
    copy.close()
