"""A small OpenAI-compatible HTTP server for tests (a test helper, not a test file).

It listens on 127.0.0.1 on an ephemeral port, answers like vLLM does, records what it received, and
can be told to misbehave for the next requests::

    with FakeOpenAIServer() as srv:
        srv.fail_next(1, status=429)
        judge = OpenAICompatibleJudge(base_url=srv.base_url, model="m")

Scoring is pluggable: ``scorer(text) -> (tokens, offsets, logprobs)`` for /v1/completions and
``rater(messages) -> {token: logprob}`` (the first generated token's top logprobs) for
/v1/chat/completions. The default scorer is a toy language model over whitespace-delimited pieces
that, like a real one, predicts a piece well when the same pair of pieces occurred earlier.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Scorer = Callable[[str], "tuple[list[str], list[int], list[float]]"]
Rater = Callable[[list[dict]], "dict[str, float]"]

_PIECE = re.compile(r"\S+\s*|\s+")
GENERATED_TOKEN = "!"
GENERATED_LOGPROB = -0.25


def toy_pieces(text: str) -> tuple[list[str], list[int]]:
    """Split ``text`` into word pieces that keep their trailing whitespace, with their offsets."""
    matches = list(_PIECE.finditer(text))
    return [m.group() for m in matches], [m.start() for m in matches]


def toy_logprob(context: list[str], piece: str) -> float:
    """-0.5 per character, or -0.05 if (last piece of ``context``, ``piece``) occurred before."""
    if context and (context[-1], piece) in set(zip(context, context[1:])):
        return -0.05
    return -0.5 * len(piece)


def toy_scorer(text: str) -> tuple[list[str], list[int], list[float]]:
    """Each piece scored given the pieces before it (what a correct server returns)."""
    pieces, offsets = toy_pieces(text)
    return pieces, offsets, [toy_logprob(pieces[:i], p) for i, p in enumerate(pieces)]


def shifted_scorer(text: str) -> tuple[list[str], list[int], list[float]]:
    """Each piece scored by the distribution that has already seen it (logprobs shifted by one token)."""
    pieces, offsets = toy_pieces(text)
    return pieces, offsets, [toy_logprob(pieces[: i + 1], p) for i, p in enumerate(pieces)]


DEFAULT_RATING_PROBS = {"7": 0.6, "8": 0.15, " 8": 0.05, "3": 0.1, "The": 0.1}
"""The default rater's distribution: digits 7/8/3 (8 split over two spellings) and a non-digit."""


def default_rater(messages: list[dict]) -> dict[str, float]:
    return {tok: math.log(p) for tok, p in DEFAULT_RATING_PROBS.items()}


WORDY_RATING_PROBS = {"The": 0.6, "I": 0.25, "This": 0.135, "1": 0.01, "2": 0.005}
"""A small judge that starts talking instead of rating: the digits hold 1.5 % of the mass."""


def wordy_rater(messages: list[dict]) -> dict[str, float]:
    return {tok: math.log(p) for tok, p in WORDY_RATING_PROBS.items()}


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased."""
    body: Any


class FakeOpenAIServer:
    """OpenAI-compatible test server; use as a context manager.

    Args:
        scorer: Tokenizes and scores a completions prompt (see module docstring).
        rater: Top logprobs of the chat reply's first token.
        chat_logprobs: False answers chat requests without logprobs (only the generated text).
        delay_s: Seconds each POST takes (to let concurrent requests pile up).
    """

    def __init__(self, scorer: Scorer = toy_scorer, rater: Rater = default_rater,
                 chat_logprobs: bool = True, delay_s: float = 0.0, model: str = "judge-model") -> None:
        self.scorer, self.rater = scorer, rater
        self.chat_logprobs, self.delay_s, self.model = chat_logprobs, delay_s, model
        self.requests: list[Received] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._queue: list[tuple[str, Any]] = []
        self._always: tuple[int, str | None] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "FakeOpenAIServer":
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # wakes hanging handlers
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "use FakeOpenAIServer as a context manager"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -- misbehaviour ----------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` POSTs with HTTP ``status``."""
        self._queue += [("status", status)] * n

    def hang_next(self, n: int, seconds: float) -> None:
        """Let the next ``n`` POSTs wait ``seconds`` and then close without an answer."""
        self._queue += [("hang", seconds)] * n

    def garbage_next(self, n: int, body: str = "json") -> None:
        """Answer the next ``n`` POSTs with a 200 that is JSON without logprobs, or ``body="text"``."""
        self._queue += [("garbage", body)] * n

    def always_fail(self, status: int = 500, when: str | None = None) -> None:
        """Answer every POST (or those whose body contains ``when``) with HTTP ``status``."""
        self._always = (status, when)

    def reset(self) -> None:
        self._queue.clear()
        self._always = None

    def posts(self, endpoint: str = "") -> list[Received]:
        """Received POSTs, optionally only those whose path ends with ``endpoint``."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith(endpoint)]

    def _behaviour(self, raw_body: str) -> tuple[str, Any] | None:
        with self._lock:
            if self._always and (self._always[1] is None or self._always[1] in raw_body):
                return ("status", self._always[0])
            return self._queue.pop(0) if self._queue else None

    # -- answers ---------------------------------------------------------------------------------
    def _completion(self, body: dict) -> dict:
        prompt = body["prompt"][0] if isinstance(body["prompt"], list) else body["prompt"]
        tokens, offsets, values = (list(x) for x in self.scorer(prompt))
        values[0] = None  # nothing precedes the first token (vLLM sends null)
        n_prompt = len(tokens)
        if body.get("echo"):
            tokens.append(GENERATED_TOKEN)
            offsets.append(len(prompt))
            values.append(GENERATED_LOGPROB)
            text = prompt + GENERATED_TOKEN
        else:
            tokens, offsets, values, text = [GENERATED_TOKEN], [0], [GENERATED_LOGPROB], GENERATED_TOKEN
        logprobs = None
        if body.get("logprobs") is not None:
            top = [None if v is None else {t: v} for t, v in zip(tokens, values)]
            logprobs = {"tokens": tokens, "token_logprobs": values, "text_offset": offsets,
                        "top_logprobs": top}
        return {
            "id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": 1,
                      "total_tokens": n_prompt + 1},
        }

    def _chat(self, body: dict) -> dict:
        top = self.rater(body["messages"])
        best = max(top, key=top.__getitem__)
        logprobs = None
        if body.get("logprobs") and self.chat_logprobs:
            alts = sorted(top.items(), key=lambda kv: -kv[1])[: body.get("top_logprobs") or 0]
            logprobs = {"content": [{
                "token": best, "logprob": top[best], "bytes": list(best.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                 for t, v in alts],
            }]}
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": best},
                         "logprobs": logprobs, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FakeOpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out leave broken pipes behind; that is expected here


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, payload: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _record(self, body: Any) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.owner.requests.append(Received(self.command, self.path, headers, body))

    def do_GET(self) -> None:
        srv = self.server.owner
        self._record(None)
        if self.path.rstrip("/").endswith("/models"):
            data = {"object": "list", "data": [{"id": srv.model, "object": "model", "created": 0,
                                                "owned_by": "test"}]}
            self._send(200, json.dumps(data).encode())
        elif self.path.startswith("/api/models/"):  # the Hub's model API, which knows no model
            self._send(404, b'{"error": "Repository not found"}', headers={"X-Error-Code": "RepoNotFound"})
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        srv = self.server.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        body = json.loads(raw or "{}")
        self._record(body)
        with srv._lock:
            srv._in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv._in_flight)
        try:
            self._answer(srv, raw, body)
        finally:
            with srv._lock:
                srv._in_flight -= 1

    def _answer(self, srv: FakeOpenAIServer, raw: str, body: dict) -> None:
        behaviour = srv._behaviour(raw)
        if srv.delay_s:
            time.sleep(srv.delay_s)
        if behaviour is not None:
            kind, arg = behaviour
            if kind == "status":
                error = {"error": {"message": f"injected HTTP {arg}", "type": "test", "code": arg}}
                return self._send(arg, json.dumps(error).encode())
            if kind == "hang":
                srv._stop.wait(arg)
                return  # the connection closes without an answer
            if arg == "text":
                return self._send(200, b"<html>upstream hiccup</html>", "text/html")
            # valid JSON, but without logprobs and without a rating digit
            garbage = {"id": "x", "object": "text_completion", "choices": [{
                "index": 0, "text": "", "finish_reason": "stop",
                "message": {"role": "assistant", "content": "hmm"}}]}
            return self._send(200, json.dumps(garbage).encode())
        path = self.path.rstrip("/")
        if path.endswith("/chat/completions"):
            return self._send(200, json.dumps(srv._chat(body)).encode())
        if path.endswith("/completions"):
            return self._send(200, json.dumps(srv._completion(body)).encode())
        self._send(404, b'{"error": {"message": "not found"}}')
