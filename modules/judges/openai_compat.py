"""A judge behind an OpenAI-compatible HTTP API (vLLM, SGLang, TGI, llama.cpp, OpenAI, OpenRouter).

Which mode fits which server:

- ``mode="echo"`` (exact, ``kind="loglik"``): teacher-forced scoring on the *completions* endpoint.
  The judge's chat text is rendered here (:mod:`modules.judges.chat_format`), the policy's response
  is appended, and ``echo=True, logprobs=1`` returns the log-probability of every prompt token; the
  response's span is summed. Fits vLLM, SGLang (whose offsets are rebuilt from the token texts) and
  other servers that return prompt
  logprobs with echo.
  Other servers may answer echo requests with logprobs shifted by one position against their
  tokens, or with no prompt logprobs at all: keep ``alignment_check`` on, and
  :meth:`OpenAICompatibleJudge.preflight` refuses such a server before training starts. (One user
  reported llama-cpp-python v0.3.36 passing the check and scoring within 0.2-1 nats of the local
  judge; the README's provider table has the details.)
- ``mode="rating"`` (not exact, ``kind="rating"``): for providers whose chat endpoint only returns
  logprobs of tokens the judge generates itself (OpenAI, OpenRouter). The judge, playing the
  persona, rates the response with one digit 0-9; the reward is the probability-weighted digit read
  from ``top_logprobs`` of that one generated token, or the sampled digit when the server returns
  no logprobs. This measures the persona's stated approval, not the likelihood of the response.
  A small judge may hardly answer with a digit at all: when the digits hold under 10 % of the
  rating token's top log-prob mass over the first replies, one warning says so, with the share.

HTTP errors (408/409/429/5xx, timeouts, dropped connections) are retried by the ``openai`` client
itself with exponential backoff; a 200 reply that cannot be used (no logprobs, no digit, not JSON)
is retried here ``garbage_retries`` times. A request that still fails scores ``None`` and logs one
warning line; the API key is read from an environment variable and never stored or logged.
"""

from __future__ import annotations

import itertools

import asyncio
import json
import logging
import math
import os
import random
import re
from typing import Any, Literal, Sequence
from urllib.parse import urlparse

import openai

from modules.errors import UserError
from modules.judges import background
from modules.judges.base import Judge, Judgement, JudgeRequest, concurrency_per_rank
from modules.judges.chat_format import render_judge_prefix

log = logging.getLogger(__name__)

RATING_INSTRUCTIONS = (
    "You will be shown a message from a user and a reply that someone else wrote to it. Judge the "
    "reply as the person described above: how much would you endorse it, and want to have written "
    "it yourself? Answer with a single digit from 0 (not at all) to 9 (completely) and nothing else."
)

# preflight's alignment probe: a line of unpredictable words, then the same line again. With
# logprobs aligned to their tokens, any language model predicts the second copy far better than
# the first; logprobs shifted by one position (each token scored by the distribution that already
# saw it) make the two copies score alike.
_PHRASE = "violet anchor 47 quiet lemon orbit sparrow 12 copper tide"
_PROBE = JudgeRequest(
    system="You are a helpful assistant.",
    prompt="Write a line of ten random words, then write the same line again.",
    response=f"{_PHRASE}\n{_PHRASE}",
)
_MIN_COPY_GAIN = 1.0  # nats per token the second copy must gain over the first
_PREFLIGHT_TIMEOUT_S = 10.0
_DIGITS = "0123456789"
_MIN_DIGIT_SHARE = 0.10  # below this share of the top log-prob mass, ratings carry little signal
_DIGIT_SHARE_REPLIES = 8  # replies averaged before the share is judged


class _Garbage(Exception):
    """A 200 reply that cannot be turned into a judgement."""


_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_KEY_PREFIXES = ("sk-", "sk_", "hf_", "ghp_", "gsk_", "xai-", "pk-", "rk-", "AIza")


def check_variable_name(api_key_env: str) -> None:
    """Refuse an ``api_key_env`` that is not an environment variable's name (a key pasted in its place)
    with a message that never repeats the value, so the key reaches no log, config or checkpoint."""
    looks_like_key = api_key_env.startswith(_KEY_PREFIXES) or (
        len(api_key_env) >= 24 and any(c.islower() for c in api_key_env) and any(c.isupper() for c in api_key_env)
        and any(c.isdigit() for c in api_key_env))
    if looks_like_key or not _VARIABLE_NAME.fullmatch(api_key_env):
        raise UserError("judge api_key_env must be the NAME of the environment variable that holds the key "
                        "(letters, digits and _, e.g. OPENROUTER_API_KEY), not the key itself; the value given "
                        "is not shown or saved: export the key as a variable and name the variable here")


class OpenAICompatibleJudge(Judge):
    """A judge served over an OpenAI-compatible API; see the module docstring for the modes.

    Args:
        base_url: The server's API root, e.g. https://openrouter.ai/api/v1 or http://127.0.0.1:8000/v1.
        model: The judge model's name on that server.
        mode: "echo" scores the response exactly via completions echo logprobs (vLLM, SGLang);
            "rating" asks the chat endpoint for a 0-9 rating (OpenAI, OpenRouter).
        prompt_format: Chat template for echo mode: chatml, llama3, mistral, or a tokenizer folder
            or Hub id whose chat template is used.
        alignment_check: In echo mode, check in preflight that the server's logprobs line up with
            its tokens (some servers shift them by one position).
        api_key_env: Name of the environment variable that holds the API key (the key itself is
            never passed as an argument); unset means no key, fine for a local server.
        max_concurrency: Most requests in flight at once, over all training ranks together (each of
            N ranks keeps at most ``max_concurrency // N``, at least one).
        timeout_s: Seconds before one HTTP attempt times out.
        max_retries: Retries of the openai client for 408/409/429/5xx, timeouts and connection errors.
        garbage_retries: Retries of a reply that arrived but cannot be used (no logprobs, no digit).
        cache_size: How many judgements to keep in the in-memory response cache (0 disables it).
    """

    _garbage_backoff_s: float = 0.5
    """First pause before retrying an unusable reply; doubles each time (tests shorten it)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        mode: Literal["echo", "rating"] = "echo",
        prompt_format: str = "chatml",
        alignment_check: bool = True,
        api_key_env: str = "OPENROUTER_API_KEY",
        max_concurrency: int = 16,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        garbage_retries: int = 2,
        cache_size: int = 50_000,
    ) -> None:
        super().__init__(cache_size)
        if mode not in ("echo", "rating"):
            raise UserError(f"judge mode must be 'echo' or 'rating', not {mode!r}")
        url = urlparse(base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise UserError(f"judge base_url {base_url!r} is not an http(s) URL: give the server's API root, "
                            "e.g. http://127.0.0.1:8000/v1 or https://openrouter.ai/api/v1")
        for name, value, least in (("max_concurrency", max_concurrency, 1), ("max_retries", max_retries, 0),
                                   ("garbage_retries", garbage_retries, 0)):
            if value < least:
                raise UserError(f"judge {name} must be at least {least}, got {value}")
        if not timeout_s > 0:
            raise UserError(f"judge timeout_s must be > 0 seconds, got {timeout_s}")
        check_variable_name(api_key_env)
        self.base_url = base_url
        self.model = model
        self.mode = mode
        self.prompt_format = prompt_format
        self.alignment_check = alignment_check
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.garbage_retries = garbage_retries
        if mode == "rating":
            self.kind = "rating"
        self.parsed_fallbacks = 0
        """Ratings read from the generated text because the server sent no logprobs."""
        self.digit_share_sum, self.digit_share_count = 0.0, 0
        """Running sum and count of the digits' share of the rating token's top log-prob mass."""
        self._warned_digit_share = False
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._semaphore_size = 0

    @property
    def identity(self) -> str:
        return f"openai:{self.base_url}:{self.model}:{self.mode}:{self.prompt_format}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
                f"mode={self.mode!r}, prompt_format={self.prompt_format!r}, "
                f"api_key_env={self.api_key_env!r})")

    def __getstate__(self) -> dict[str, Any]:
        # the client holds sockets bound to the background loop: a copy makes its own when used
        return {**self.__dict__, "_client": None, "_semaphore": None}

    # -- client ----------------------------------------------------------------------------------
    def _new_client(self, timeout_s: float, max_retries: int) -> openai.AsyncOpenAI:
        key = os.environ.get(self.api_key_env) or "EMPTY"  # local servers accept any key
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, timeout=timeout_s,
                                  max_retries=max_retries)

    def _ensure_client(self) -> openai.AsyncOpenAI:
        """The shared client, made on first use on the background loop that it will stay bound to."""
        if self._client is None:
            self._client = self._new_client(self.timeout_s, self.max_retries)
        share = concurrency_per_rank(self.max_concurrency)  # the budget is global: split among ranks
        if self._semaphore is None or self._semaphore_size != share:
            self._semaphore, self._semaphore_size = asyncio.Semaphore(share), share
        return self._client

    def close(self) -> None:
        client, self._client, self._semaphore = self._client, None, None
        if client is not None:
            background.run(client.close())

    # -- scoring ---------------------------------------------------------------------------------
    async def _score_uncached(self, requests: Sequence[JudgeRequest]) -> list[Judgement | None]:
        client = self._ensure_client()
        return list(await asyncio.gather(*(self._score_one(client, r) for r in requests)))

    async def _score_one(self, client: openai.AsyncOpenAI, request: JudgeRequest) -> Judgement | None:
        if self.mode == "echo" and not request.response:
            return Judgement(total=0.0, num_tokens=0)  # the empty token sequence has log-prob 0
        assert self._semaphore is not None
        for attempt in range(self.garbage_retries + 1):
            try:
                async with self._semaphore:
                    raw = await self._send(client, request)
                self._stats.retries += raw.retries_taken
                return self._parse(request, raw.text)
            except _Garbage as err:
                if attempt == self.garbage_retries:
                    log.warning("judge %s: unusable reply %d times (%s); request dropped",
                                self.base_url, attempt + 1, err)
                    return None
                self._stats.retries += 1
                pause = self._garbage_backoff_s * 2**attempt * random.uniform(0.5, 1.0)
                await asyncio.sleep(pause)
            except openai.APIError as err:
                log.warning("judge %s: request failed (%s); request dropped",
                            self.base_url, _describe(err))
                return None
        raise AssertionError("unreachable")

    async def _send(self, client: openai.AsyncOpenAI, request: JudgeRequest) -> Any:
        """One request (with the client's own HTTP retries); returns the raw, unparsed response."""
        if self.mode == "echo":
            prefix = render_judge_prefix(request.system, request.prompt, self.prompt_format)
            # max_tokens=1, not 0: servers differ on 0; the generated token is cut off in parsing
            return await client.completions.with_raw_response.create(
                model=self.model, prompt=prefix + request.response, echo=True, logprobs=1,
                max_tokens=1, temperature=0.0,
            )
        return await client.chat.completions.with_raw_response.create(
            model=self.model, messages=rating_messages(request), max_tokens=1, temperature=0.0,
            logprobs=True, top_logprobs=20,
        )

    def _parse(self, request: JudgeRequest, text: str) -> Judgement:
        try:
            body = json.loads(text)
            choice = body["choices"][0]
            if self.mode == "echo":
                values = [lp for _, lp, _ in echo_span(choice, body.get("usage"), request.response)]
                if any(v is None for v in values):
                    raise _Garbage("a response token has no logprob")
                return Judgement(total=float(sum(values)), num_tokens=len(values))
            return self._parse_rating(choice)
        except json.JSONDecodeError:
            raise _Garbage("the reply is not JSON") from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise _Garbage(f"malformed reply ({type(err).__name__} {err})") from None

    def _parse_rating(self, choice: dict) -> Judgement:
        probs = [0.0] * 10
        listed = 0.0  # probability of every listed alternative
        content = (choice.get("logprobs") or {}).get("content") or []
        alternatives = (content[0].get("top_logprobs") or []) if content else []
        for alt in alternatives:
            token, logprob = str(alt.get("token", "")).strip(), alt.get("logprob")
            if isinstance(logprob, (int, float)):
                listed += math.exp(logprob)
                if len(token) == 1 and token in _DIGITS:
                    probs[int(token)] += math.exp(logprob)
        if sum(probs) > 0:
            self._note_digit_share(sum(probs) / listed, len(alternatives))
            return Judgement(total=sum(d * p for d, p in enumerate(probs)) / sum(probs), num_tokens=1)
        text = ((choice.get("message") or {}).get("content") or "").strip()
        if text and text[0] in _DIGITS:
            self.parsed_fallbacks += 1
            return Judgement(total=float(text[0]), num_tokens=1)
        raise _Garbage("no rating digit in the reply's logprobs or text")

    def _note_digit_share(self, share: float, listed: int) -> None:
        """Warn once per run when the digits hold a negligible share of the rating token's top
        log-prob mass: the rating is renormalised from a sliver of the distribution, and a judge
        that does not really answer with a digit tends to give every reply the same reward."""
        self.digit_share_sum += share
        self.digit_share_count += 1
        mean = self.digit_share_sum / self.digit_share_count
        if self._warned_digit_share or self.digit_share_count < _DIGIT_SHARE_REPLIES or mean >= _MIN_DIGIT_SHARE:
            return
        self._warned_digit_share = True
        log.warning("judge %s (rating mode): the digits 0-9 hold only %.1f%% of the log-prob mass of the top-%d "
                    "tokens of its rating, averaged over its first %d replies: the ratings are read from a sliver "
                    "of what the judge would say and may barely depend on the reply (the policy then trains on "
                    "noise). Use a judge model that answers with a digit, or mode=echo",
                    self.base_url, 100 * mean, listed, self.digit_share_count)

    # -- preflight -------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Send one request (short timeout, no retries); in echo mode also check the alignment."""
        host = urlparse(self.base_url).hostname or ""
        local = host in ("localhost", "::1") or host.startswith("127.")
        if not local and not os.environ.get(self.api_key_env):
            raise UserError(
                f"judge at {self.base_url} needs an API key: export {self.api_key_env}=<your key> "
                "(or point --model.judge.init_args.api_key_env at the variable that holds it)"
            )
        request = _PROBE if self.mode == "echo" and self.alignment_check else JudgeRequest(
            system="You are a helpful assistant.", prompt="Say hello.", response="Hello!")
        if self.mode == "echo":
            render_judge_prefix(request.system, request.prompt, self.prompt_format)  # loads a tokenizer
        fallbacks = self.parsed_fallbacks
        try:
            text = background.run(self._preflight_send(request))
            judgement = self._parse(request, text)
        except openai.APIStatusError as err:
            raise UserError(self._status_problem(err)) from None
        except openai.APIError as err:
            raise UserError(
                f"judge at {self.base_url} did not answer ({_describe(err)}): start the server "
                "or fix --model.judge.init_args.base_url") from None
        except _Garbage as err:
            raise UserError(
                f"judge at {self.base_url} answered the {self.mode}-mode probe unusably ({err}); "
                + ("does it return prompt logprobs with echo=true? Otherwise use mode=rating"
                   if self.mode == "echo" else "does the model answer with a digit?")) from None
        if self.mode == "echo" and self.alignment_check:
            body = json.loads(text)
            self._check_alignment(body["choices"][0], body.get("usage"))
        if self.parsed_fallbacks > fallbacks:
            log.warning("judge %s returns no logprobs: rewards will be sampled digits, not "
                        "expected ratings", self.base_url)
        log.info("judge %s (%s, %s) answered preflight: %s", self.base_url, self.model, self.mode,
                 judgement)

    async def _preflight_send(self, request: JudgeRequest) -> str:
        client = self._new_client(min(self.timeout_s, _PREFLIGHT_TIMEOUT_S), max_retries=0)
        try:
            return (await self._send(client, request)).text
        finally:
            await client.close()

    def _status_problem(self, err: openai.APIStatusError) -> str:
        code, url = err.status_code, self.base_url
        detail = (str(err.message).splitlines() or [""])[0][:200]
        if code in (401, 403):
            return (f"judge at {url} refused the API key from ${self.api_key_env} (HTTP {code}): "
                    "check that variable")
        if code in (400, 404, 422):
            return (f"judge at {url} rejected a {self.mode} request for model {self.model!r} "
                    f"(HTTP {code}: {detail}): fix --model.judge.init_args.model, or the mode if "
                    "the server lacks that feature")
        return (f"judge at {url} did not answer (HTTP {code}): start the server or fix "
                "--model.judge.init_args.base_url")

    def _check_alignment(self, choice: dict, usage: dict | None) -> None:
        """Raise ``UserError`` unless the echoed logprobs line up with the probe's text."""
        response = _PROBE.response
        span = echo_span(choice, usage, response)
        start = span[0][2]
        problem = None
        if "".join(tok for tok, _, _ in span) != response:
            problem = "the tokens of the response span do not spell the response"
        else:
            second = start + len(_PHRASE) + 1  # where the second copy starts
            copy1 = [lp for _, lp, off in span if start < off < second - 1]
            copy2 = [lp for _, lp, off in span if off > second]
            mean1, mean2 = sum(copy1) / max(len(copy1), 1), sum(copy2) / max(len(copy2), 1)
            if not copy1 or not copy2 or mean2 < mean1 + _MIN_COPY_GAIN:
                problem = (f"a repeated line scored {mean2:.2f} nats/token, the first copy "
                           f"{mean1:.2f}: the logprobs look shifted against their tokens")
        if problem:
            raise UserError(
                f"judge at {self.base_url} returns echo logprobs misaligned with the text "
                f"({problem}); use a vLLM/SGLang server or mode=rating, or set "
                "--model.judge.init_args.alignment_check=false if you trust it")
        prompt_len = len(render_judge_prefix(_PROBE.system, _PROBE.prompt, self.prompt_format))
        prompt_len += len(response)
        end = start + len(response)
        if end != prompt_len:
            log.warning("judge %s: its tokens spell %d characters where the prompt has %d (did it "
                        "add a BOS token of its own before the template's?)",
                        self.base_url, end, prompt_len)


def echo_span(choice: dict, usage: dict | None, response: str) -> list[tuple[str, Any, int]]:
    """``(token, logprob, text_offset)`` of the response's tokens in an echo reply.

    The span is anchored at the end of the prompt (where the generated tokens begin), not at its
    start: a server that adds its own BOS, or spells the template's special tokens differently,
    shifts every offset, but the response's own text keeps its length.
    """
    lp = choice["logprobs"]
    tokens, values, offsets = lp["tokens"], lp["token_logprobs"], lp["text_offset"]
    if not len(tokens) == len(values) == len(offsets):
        raise _Garbage("logprobs arrays differ in length")
    if offsets and all(isinstance(o, int) and o < 0 for o in offsets):  # SGLang sends -1 for every offset:
        offsets = [0, *itertools.accumulate(len(t) for t in tokens[:-1])]  # each token starts where the last ended
    n_gen = (usage or {}).get("completion_tokens")
    n_gen = n_gen if isinstance(n_gen, int) and 0 <= n_gen < len(tokens) else 1
    n_prompt = len(tokens) - n_gen
    if n_prompt < 1:
        raise _Garbage("no prompt tokens echoed")
    end = offsets[n_prompt] if n_gen else offsets[-1] + len(tokens[-1])
    start = end - len(response)
    span = [(tokens[i], values[i], offsets[i]) for i in range(n_prompt) if offsets[i] >= start]
    if not span:
        raise _Garbage("the response span holds no tokens")
    return span


def rating_messages(request: JudgeRequest) -> list[dict[str, str]]:
    """Chat messages asking the persona (``request.system``) for a 0-9 rating of the response."""
    system = f"{request.system}\n\n{RATING_INSTRUCTIONS}" if request.system else RATING_INSTRUCTIONS
    user = (f"The user's message:\n<<<\n{request.prompt}\n>>>\n\n"
            f"The reply:\n<<<\n{request.response}\n>>>\n\n"
            "Your rating (one digit, 0-9):")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _describe(err: openai.APIError) -> str:
    """What failed, in a few words (status code or kind; never headers, so never the key)."""
    if isinstance(err, openai.APIStatusError):
        return f"HTTP {err.status_code}, {type(err).__name__}"
    if isinstance(err, openai.APITimeoutError):
        return "timed out"
    if isinstance(err, openai.APIConnectionError):
        return "connection failed"
    return type(err).__name__
