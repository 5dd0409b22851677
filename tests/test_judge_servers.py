"""The judge client against responses shaped exactly like vLLM's and SGLang's (docs/judge_servers.md).

A small variant of tests/openai_server.py answers /v1/completions (echo mode) and
/v1/chat/completions (rating mode) with every field those servers send, laid out as their OpenAI
layers lay it out (vLLM: ``vllm/entrypoints/openai/completion/serving.py``, ``_create_completion_logprobs``;
SGLang: ``python/sglang/srt/entrypoints/openai/serving_completions.py`` and ``to_openai_style_logprobs``
in ``.../openai/utils.py``); the tokens and their log-probs come from the suite's toy language model.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

import pytest
import yaml

from modules.judges.base import JudgeRequest
from modules.judges.openai_compat import OpenAICompatibleJudge
from tests.test_judge_openai import fast_backoff  # noqa: F401  (autouse: retries take milliseconds)
from tests.openai_server import GENERATED_LOGPROB, GENERATED_TOKEN, FakeOpenAIServer, toy_logprob, toy_pieces

ROOT = Path(__file__).resolve().parents[1]
# Pieces "Hello " "friend, " "nice " "day." score -0.5 per character under the toy model.
REQ = JudgeRequest(system="Be kind.", prompt="Hi there", response="Hello friend, nice day.")
REQ_TOTAL, REQ_TOKENS = -0.5 * (6 + 8 + 5 + 4), 4
# digits 7 (0.6), 8 (0.15 + 0.05 as "8" and " 8") and 3 (0.1) renormalised; "The" (0.1) is no digit
RATING = (7 * 0.6 + 8 * 0.2 + 3 * 0.1) / 0.9
LLAMA3_BOS = "<|begin_of_text|>"


def echo_tokens(prompt: str, bos: str) -> tuple[list[str], list[float | None]]:
    """The prompt's tokens (after the server's own BOS, if it adds one) and their log-probs, the first None."""
    pieces, _ = toy_pieces(prompt)
    values = [toy_logprob(pieces[:i], p) for i, p in enumerate(pieces)]
    tokens = [bos, *pieces] if bos else pieces
    values = [None, *values] if bos else [None, *values[1:]]
    return tokens, values


def vllm_echo(body: dict, bos: str = "") -> dict:
    """vLLM's /v1/completions reply to ``echo: true, logprobs: N, max_tokens: 1``: prompt and generated
    token in one list, text_offset the running length of the decoded tokens from 0, top_logprobs the
    token itself plus the top alternatives, the raw prompt_logprobs beside them, usage counts."""
    prompt = body["prompt"]
    tokens, values = echo_tokens(prompt, bos)
    tokens, values = [*tokens, GENERATED_TOKEN], [*values, GENERATED_LOGPROB]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    top = [None if v is None else {t: v, "\u2581alt": v - 1.0} for t, v in zip(tokens, values)]
    prompt_logprobs = [None if v is None else {str(100 + i): {"logprob": v, "rank": 1, "decoded_token": t}}
                       for i, (t, v) in enumerate(zip(tokens[:-1], values[:-1]))]
    n_prompt = len(tokens) - 1
    return {
        "id": "cmpl-8c16f81d43846721", "object": "text_completion", "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "text": prompt + GENERATED_TOKEN,
                     "logprobs": {"text_offset": offsets, "token_logprobs": values, "tokens": tokens,
                                  "top_logprobs": top},
                     "finish_reason": "length", "stop_reason": None, "token_ids": None,
                     "prompt_logprobs": prompt_logprobs, "prompt_token_ids": None, "routed_experts": None}],
        "service_tier": None, "system_fingerprint": None,
        "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + 1, "completion_tokens": 1,
                  "prompt_tokens_details": None},
        "kv_transfer_params": None,
    }


def sglang_echo(body: dict) -> dict:
    """SGLang's /v1/completions reply to the same request: the same lists, but every text_offset is
    -1 (its OpenAI layer does not compute offsets), no prompt_logprobs, and its own extra fields."""
    reply = vllm_echo(body)
    logprobs = reply["choices"][0]["logprobs"]
    logprobs["text_offset"] = [-1] * len(logprobs["tokens"])
    return {
        "id": "5d0c1b6a2f7e4c39a1b8e0f4d2c6a9b3", "object": "text_completion", "created": reply["created"],
        "model": body["model"],
        "choices": [{"index": 0, "text": reply["choices"][0]["text"], "logprobs": logprobs,
                     "finish_reason": "length", "matched_stop": None}],
        "usage": {**reply["usage"], "prompt_tokens_details": None, "reasoning_tokens": 0},
        "metadata": {"weight_version": "default"},
    }


class ShapedServer(FakeOpenAIServer):
    """tests/openai_server.py answering as vLLM (``vendor="vllm"``, optionally with its tokenizer's BOS)
    or SGLang (``vendor="sglang"``) does."""

    def __init__(self, vendor: str, bos: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.vendor, self.bos = vendor, bos

    def _completion(self, body: dict) -> dict:
        return vllm_echo(body, self.bos) if self.vendor == "vllm" else sglang_echo(body)

    def _chat(self, body: dict) -> dict:
        reply = super()._chat(body)
        choice, message = reply["choices"][0], reply["choices"][0]["message"]
        if self.vendor == "vllm":
            message.update(refusal=None, annotations=None, audio=None, function_call=None, tool_calls=[],
                           reasoning_content=None)
            choice.update(stop_reason=None, token_ids=None)
            reply.update(service_tier=None, system_fingerprint=None, prompt_logprobs=None, prompt_token_ids=None,
                         kv_transfer_params=None)
        else:
            message.update(reasoning_content=None, tool_calls=None)
            choice.update(matched_stop=None)
            reply.update(metadata={"weight_version": "default"})
        return reply


@pytest.fixture
def make_judge():
    made: list[OpenAICompatibleJudge] = []

    def make(server: FakeOpenAIServer, **kwargs) -> OpenAICompatibleJudge:
        kwargs = {"timeout_s": 2.0, "max_retries": 1, "garbage_retries": 0, **kwargs}
        made.append(OpenAICompatibleJudge(base_url=server.base_url, model="judge", **kwargs))
        return made[-1]

    yield make
    for judge in made:
        judge.close()


# -- echo mode -----------------------------------------------------------------------------------
def test_vllm_echo_scores_exactly_the_reply(make_judge):
    with ShapedServer("vllm") as server:
        judge = make_judge(server)
        judge.preflight()  # the alignment probe passes on vLLM's layout
        [j] = judge.score_blocking([REQ])
        body = server.posts("/completions")[-1].body
    assert j.total == pytest.approx(REQ_TOTAL) and j.num_tokens == REQ_TOKENS
    assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 1


def test_vllm_echo_with_the_tokenizers_own_bos(make_judge, caplog):
    """A Llama-3 tokenizer on vLLM adds <|begin_of_text|> before a prompt whose template already has one:
    every offset moves, the reply's span (found from the end of the prompt) does not."""
    with ShapedServer("vllm", bos=LLAMA3_BOS) as server:
        judge = make_judge(server, prompt_format="llama3")
        with caplog.at_level(logging.WARNING, logger="modules.judges.openai_compat"):
            judge.preflight()
        [j] = judge.score_blocking([REQ])
    assert j.total == pytest.approx(REQ_TOTAL) and j.num_tokens == REQ_TOKENS
    assert "where the prompt has" in caplog.text  # the doubled BOS is reported, not silently scored


def test_sglang_echo_scores_the_reply_from_offsets_rebuilt_from_the_token_texts(make_judge):
    """SGLang's OpenAI layer sends text_offset -1 for every token: the client rebuilds each offset as
    the running length of the token texts, passes preflight and scores the reply exactly."""
    with ShapedServer("sglang") as server:
        judge = make_judge(server)
        judge.preflight()
        [j] = judge.score_blocking([REQ])
    assert j is not None and j.total == pytest.approx(REQ_TOTAL) and j.num_tokens == REQ_TOKENS


# -- rating mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("vendor", ["vllm", "sglang"])
def test_rating_mode_reads_the_digits_of_either_server(vendor, make_judge):
    with ShapedServer(vendor) as server:
        judge = make_judge(server, mode="rating")
        judge.preflight()
        [j] = judge.score_blocking([REQ])
        body = server.posts("/chat/completions")[-1].body
    assert j.total == pytest.approx(RATING) and j.num_tokens == 1
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1


# -- the page's recipes --------------------------------------------------------------------------
def page() -> str:
    return (ROOT / "docs" / "judge_servers.md").read_text()


def test_the_pages_judge_configs_are_valid_judges():
    """Every YAML block of the page that configures the judge builds an OpenAICompatibleJudge."""
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", page(), re.S)]
    judges = [b["judge"] for b in blocks if isinstance(b, dict) and "judge" in b]
    assert len(judges) >= 3
    for spec in judges:
        assert spec["class_path"] == "modules.judges.openai_compat.OpenAICompatibleJudge"
        judge = OpenAICompatibleJudge(**spec["init_args"])
        assert judge.max_concurrency >= 1 and judge.mode in ("echo", "rating")


def test_the_pages_throughput_script_runs(monkeypatch, capsys):
    """The page's measuring script, against a vLLM-shaped server on 127.0.0.1."""
    script = re.search(r"```python\n(# judge_throughput.*?)```", page(), re.S).group(1)
    with ShapedServer("vllm") as server:
        for name, value in {"JUDGE_URL": server.base_url, "JUDGE_MODEL": "judge", "JUDGE_REQUESTS": "24",
                            "JUDGE_CONCURRENCY": "8"}.items():
            monkeypatch.setenv(name, value)
        exec(compile(script, "judge_throughput", "exec"), {"__name__": "__main__"})
        assert server.max_in_flight <= 8 and len(server.posts("/completions")) >= 24
    line = capsys.readouterr().out.strip().splitlines()[-1]
    rate = float(line.split()[0])
    assert math.isfinite(rate) and rate > 0 and "0 failed" in line
