"""An in-process judge: exact per-token log-probs of a given response under a transformers model.

The judge's text is a chat template over ``[system, user]`` with the assistant header, followed by
the response, teacher-forced: the tokenizer's own template, or ``chat_template`` (``plain``, a
``.jinja`` file or a Jinja string; :mod:`modules.judges.chat_format`), which lets a base model with
no template of its own (a Gemma-3-270M GGUF) judge. Every request is rendered by the one function
:func:`~modules.judges.chat_format.render_chat_prefix`, so the shared prefix below is that text's
too. The response's tokens are those whose character offset falls at or after the end of the
rendered prefix (a token that straddles the boundary would count as prefix; chat templates, and
``plain``, avoid one by ending the header with a newline).

With ``model=None`` the judge shares the policy's weights: the training module hands it the
policy and a context that switches the policy's interventions off (``attach_shared``), so no
second copy of the model sits in memory.

Shared prefix: requests with the same system prompt (a persona) start with the same tokens. Their
longest common token prefix (the system turn, often more) is run once per call as one row, and its
keys and values serve every row of the group (``share_prefix``; the log-probs are the same to float
rounding). Requests are scored grouped by system prompt, in batches of ``batch_size``.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F

from modules.errors import UserError
from modules.judges.base import Judge, Judgement, JudgeRequest
from modules.judges.chat_format import render_chat_prefix, resolve_chat_template, template_label
from modules.models.loading import load_causal_lm


class LocalJudge(Judge):
    """Scores responses with a local transformers model.

    Args:
        model: Model to judge with (Hub id, folder, .gguf file or ``embedded:smollm2``); None
            shares the policy model with its interventions switched off.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
        batch_size: Sequences per forward pass.
        cache_size: Judgements kept in the response cache.
        share_prefix: Run the prefix that a group of requests shares once (see the module docstring).
        chat_template: How the judge's prompt is written: None for the model's own chat template;
            ``plain`` (``{system}\\n\\nUser: {user}\\nAssistant:\\n``, for a base model), a ``.jinja``
            file, or a Jinja chat template as a string.
    """

    overlaps_generation = False
    MIN_SHARED_TOKENS = 8
    """A shared prefix shorter than this is not worth a separate pass."""

    def __init__(self, model: str | None = None, dtype: str = "auto", batch_size: int = 16, cache_size: int = 50_000,
                 share_prefix: bool = True, chat_template: str | None = None):
        super().__init__(cache_size)
        if batch_size < 1:
            raise UserError(f"judge batch_size must be at least 1, got {batch_size}")
        self.model_name, self.dtype, self.batch_size = model, dtype, batch_size
        self.share_prefix = share_prefix
        self.chat_template = chat_template
        self._template = resolve_chat_template(chat_template)
        self.prefix_tokens_saved = 0
        """Tokens not recomputed thanks to shared prefixes, since creation (a test and tuning aid)."""
        self._model = self._tokenizer = None
        self._context: Callable[[], ContextManager] = nullcontext
        if model is not None:
            self._model, self._tokenizer = load_causal_lm(model, dtype)
            self._check_template()

    def attach_shared(self, model, tokenizer, context: Callable[[], ContextManager]) -> None:
        """Judge with the policy's own model, entering ``context()`` (interventions off) per pass."""
        if self.model_name is None:
            self._model, self._tokenizer, self._context = model, tokenizer, context

    @property
    def identity(self) -> str:
        template = f":template={template_label(self.chat_template)}" if self.chat_template else ""
        return f"local:{self.model_name or 'policy'}{template}"

    def to(self, device) -> "LocalJudge":
        if self.model_name is not None and self._model is not None:
            self._model.to(device)
        return self

    def preflight(self) -> None:
        if self._model is None:
            raise RuntimeError("LocalJudge(model=None) must be attached to the policy before use")
        self._check_template()

    def _check_template(self) -> None:
        """One line naming the option when the judge has no template to write its prompt with."""
        if self._template is None and not getattr(self._tokenizer, "chat_template", None):
            whose = f"the judge model '{self.model_name}'" if self.model_name else "the policy model the judge shares"
            raise UserError(f"{whose} has no chat template (a base model?): set the judge's chat_template to "
                            "'plain', a .jinja file or a Jinja string")

    async def _score_uncached(self, requests: Sequence[JudgeRequest]) -> list[Judgement | None]:
        self.preflight()
        encoded = [self._encode(r) for r in requests]
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.system, []).append(i)
        results: list[Judgement | None] = [None] * len(requests)
        for rows in groups.values():
            shared = self._shared_prefix([encoded[i] for i in rows]) if self.share_prefix and len(rows) > 1 else 0
            prefix_cache = None
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                if shared and prefix_cache is None:
                    prefix_cache = self._prefix_cache(encoded[chunk[0]][0][:shared])
                scored = self._score_batch([encoded[i] for i in chunk], shared, prefix_cache)
                for i, judgement in zip(chunk, scored):
                    results[i] = judgement
        return results

    def _encode(self, request: JudgeRequest) -> tuple[list[int], int]:
        """Token ids of prefix + response, and the index of the first response token."""
        prefix = render_chat_prefix(self._tokenizer, request.system, request.prompt, self._template)
        enc = self._tokenizer(prefix + request.response, add_special_tokens=False, return_offsets_mapping=True)
        first = next((i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= len(prefix)), len(enc["input_ids"]))
        return enc["input_ids"], first

    def _shared_prefix(self, encoded: list[tuple[list[int], int]]) -> int:
        """Length of the token prefix every row shares, ending before any position whose hidden
        state is needed (the one before each row's first response token); 0 if too short."""
        first_ids = encoded[0][0]
        length = min(min(first for _, first in encoded) - 1, min(len(ids) for ids, _ in encoded))
        for ids, _ in encoded[1:]:
            length = next((k for k in range(length) if ids[k] != first_ids[k]), length)
        return length if length >= self.MIN_SHARED_TOKENS else 0

    def _decoder_call(self, decoder, cache, **kwargs):
        """The decoder with a KV cache, under the keyword this transformers version uses."""
        name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        out = decoder(use_cache=True, **{name: cache}, **kwargs)
        return out.last_hidden_state, getattr(out, "cache", None) or getattr(out, "past_key_values", None)

    @torch.inference_mode()
    def _prefix_cache(self, prefix_ids: list[int]):
        device = next(self._model.parameters()).device
        with self._context():
            _, cache = self._decoder_call(self._model.get_decoder(), None,
                                          input_ids=torch.tensor([prefix_ids], device=device))
        return cache

    @torch.inference_mode()
    def _score_batch(self, encoded: list[tuple[list[int], int]], shared: int = 0,
                     prefix_cache=None) -> list[Judgement | None]:
        """Exact log-probs of each row's response; with ``shared`` > 0, the rows' first ``shared``
        tokens come from ``prefix_cache`` and only the rest is run."""
        device = next(self._model.parameters()).device
        length = max(len(ids) for ids, _ in encoded) - shared
        pad = self._tokenizer.pad_token_id or 0
        input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), shared + length), dtype=torch.long)
        for row, (ids, _) in enumerate(encoded):  # right padding: positions need no shifting
            input_ids[row, : len(ids) - shared] = torch.tensor(ids[shared:])
            attention[row, : len(ids)] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        decoder = self._model.get_decoder()
        with self._context():
            if shared:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(encoded))
                hidden, _ = self._decoder_call(decoder, cache, input_ids=input_ids, attention_mask=attention)
                self.prefix_tokens_saved += shared * (len(encoded) - 1)
            else:
                hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        weight = self._model.get_output_embeddings().weight
        results: list[Judgement | None] = []
        for row, (ids, first) in enumerate(encoded):
            n = len(ids) - first
            if n <= 0:
                results.append(Judgement(0.0, 0))
                continue
            logits = F.linear(hidden[row, first - 1 - shared : len(ids) - 1 - shared], weight).float()
            targets = input_ids[row, first - shared : len(ids) - shared, None]
            logp = F.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)
            results.append(Judgement(float(logp.sum()), n))
        return results
