"""An in-process judge: exact per-token log-probs of a given response under a transformers model.

The judge's text is its own chat template over ``[system, user]`` with the assistant header,
followed by the response, teacher-forced. The response's tokens are those whose character offset
falls at or after the end of the rendered prefix (so a token that straddles the boundary, which
chat templates avoid by ending the header with a newline, would count as response).

With ``model=None`` the judge shares the policy's weights: the training module hands it the
policy and a context that switches the policy's interventions off (``attach_shared``), so no
second copy of the model sits in memory.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F

from modules.judges.base import Judge, Judgement, JudgeRequest
from modules.models.loading import load_causal_lm


class LocalJudge(Judge):
    """Scores responses with a local transformers model.

    Args:
        model: Model to judge with (Hub id, folder, .gguf file or ``embedded:smollm2``); None
            shares the policy model with its interventions switched off.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
        batch_size: Sequences per forward pass.
        cache_size: Judgements kept in the response cache.
    """

    overlaps_generation = False

    def __init__(self, model: str | None = None, dtype: str = "auto", batch_size: int = 16, cache_size: int = 50_000):
        super().__init__(cache_size)
        if batch_size < 1:
            from modules.errors import UserError

            raise UserError(f"judge batch_size must be at least 1, got {batch_size}")
        self.model_name, self.dtype, self.batch_size = model, dtype, batch_size
        self._model = self._tokenizer = None
        self._context: Callable[[], ContextManager] = nullcontext
        if model is not None:
            self._model, self._tokenizer = load_causal_lm(model, dtype)

    def attach_shared(self, model, tokenizer, context: Callable[[], ContextManager]) -> None:
        """Judge with the policy's own model, entering ``context()`` (interventions off) per pass."""
        if self.model_name is None:
            self._model, self._tokenizer, self._context = model, tokenizer, context

    @property
    def identity(self) -> str:
        return f"local:{self.model_name or 'policy'}"

    def to(self, device) -> "LocalJudge":
        if self.model_name is not None and self._model is not None:
            self._model.to(device)
        return self

    def preflight(self) -> None:
        if self._model is None:
            raise RuntimeError("LocalJudge(model=None) must be attached to the policy before use")

    async def _score_uncached(self, requests: Sequence[JudgeRequest]) -> list[Judgement | None]:
        self.preflight()
        results: list[Judgement | None] = []
        for start in range(0, len(requests), self.batch_size):
            results.extend(self._score_batch(requests[start : start + self.batch_size]))
        return results

    def _encode(self, request: JudgeRequest) -> tuple[list[int], int]:
        """Token ids of prefix + response, and the index of the first response token."""
        messages = [{"role": "system", "content": request.system}, {"role": "user", "content": request.prompt}]
        prefix = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self._tokenizer(prefix + request.response, add_special_tokens=False, return_offsets_mapping=True)
        first = next((i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= len(prefix)), len(enc["input_ids"]))
        return enc["input_ids"], first

    @torch.inference_mode()
    def _score_batch(self, requests: Sequence[JudgeRequest]) -> list[Judgement | None]:
        encoded = [self._encode(r) for r in requests]
        device = next(self._model.parameters()).device
        length = max(len(ids) for ids, _ in encoded)
        pad = self._tokenizer.pad_token_id or 0
        input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, (ids, _) in enumerate(encoded):  # right padding: positions need no shifting
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        with self._context():
            hidden = self._model.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
        weight = self._model.get_output_embeddings().weight
        results: list[Judgement | None] = []
        for row, (ids, first) in enumerate(encoded):
            n = len(ids) - first
            if n <= 0:
                results.append(Judgement(0.0, 0))
                continue
            logits = F.linear(hidden[row, first - 1 : len(ids) - 1], weight).float()
            logp = F.log_softmax(logits, dim=-1).gather(-1, input_ids[row, first : len(ids), None]).squeeze(-1)
            results.append(Judgement(float(logp.sum()), n))
        return results
