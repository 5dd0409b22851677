"""Generation of on-policy rollouts, and the teacher-forced forward pass over them.

Everything that samples from a policy goes through :func:`rollout`. On a GPU it runs the rollout
engine (:mod:`modules.engine`: a static KV cache, the decode step captured as CUDA graphs, the
steering / LoRA / injection inside the step, sampling on the GPU); where the engine does not apply
(an architecture or hook it does not know, the CPU) it uses HF ``generate`` and says so once.
``RLI_ROLLOUT_ENGINE`` chooses: ``auto`` (default: the engine on CUDA), ``engine`` (also on the
CPU, eager steps), ``hf`` (always HF ``generate``).
Prompts are left-padded to a common length ``P``; responses start at position ``P`` in every row,
which the steering position rules and :func:`response_hidden_states` rely on.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ContextManager

import torch
from torch import nn

log = logging.getLogger(__name__)
_said: set[str] = set()


def _say_once(message: str, level: int = logging.WARNING) -> None:
    if message not in _said:
        _said.add(message)
        log.log(level, message)


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled."""

    max_new_tokens: int = 120
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Rollout:
    """One micro-batch of prompts and the responses sampled for them."""

    prompts: list[str]
    """The raw user prompts (before the chat template)."""
    prompt_ids: torch.Tensor
    """[B, P] left-padded prompt token ids (chat template applied)."""
    prompt_mask: torch.Tensor
    """[B, P] 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """[B, R] sampled tokens, right-padded; includes the end-of-turn token when one was sampled."""
    response_mask: torch.Tensor
    """[B, R] 1 on response tokens up to and including the first end-of-turn token."""
    responses: list[str]
    """Decoded responses (special tokens removed), what the judge scores."""
    seconds: float = 0.0
    """Wall time of generation."""
    records: list[dict] = field(default_factory=list)
    """Per-row data the prompts came with (a JSONL row: reference answers, baseline replies, ...)."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The given rows, with prompt and response columns that are padding in every row dropped."""
        rows = rows.to(self.prompt_ids.device)
        prompt_mask, response_mask = self.prompt_mask[rows], self.response_mask[rows]
        first = int(prompt_mask.any(0).nonzero()[0]) if prompt_mask.any() else prompt_mask.shape[1]
        width = int(response_mask.any(0).nonzero()[-1]) + 1 if response_mask.any() else 0
        picked = rows.tolist()
        return Rollout([self.prompts[i] for i in picked], self.prompt_ids[rows][:, first:], prompt_mask[:, first:],
                       self.response_ids[rows][:, :width], response_mask[:, :width],
                       [self.responses[i] for i in picked], self.seconds,
                       [self.records[i] for i in picked] if self.records else [])

    @staticmethod
    def concat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """Rows of several rollouts: prompts left-padded and responses right-padded to common widths."""
        width_p = max(r.prompt_ids.shape[1] for r in parts)
        width_r = max(r.response_ids.shape[1] for r in parts)

        def pad(t: torch.Tensor, width: int, left: bool, value: int) -> torch.Tensor:
            extra = width - t.shape[1]
            return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

        return Rollout(
            [p for r in parts for p in r.prompts],
            torch.cat([pad(r.prompt_ids, width_p, True, pad_id) for r in parts]),
            torch.cat([pad(r.prompt_mask, width_p, True, 0) for r in parts]),
            torch.cat([pad(r.response_ids, width_r, False, pad_id) for r in parts]),
            torch.cat([pad(r.response_mask, width_r, False, 0) for r in parts]),
            [t for r in parts for t in r.responses],
            sum(r.seconds for r in parts),
            [rec for r in parts for rec in r.records] if all(r.records for r in parts) else [],
        )


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-turn ids: the generation config's ``eos_token_id`` (int or list) and the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def response_mask_from_ids(response_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first stop token of each row (all ones if none was sampled)."""
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))
    stops_before = torch.cumsum(is_stop.long(), dim=-1) - is_stop.long()
    return (stops_before == 0).long()


def decode_response(tokenizer, ids: torch.Tensor, mask: torch.Tensor, stop_ids: list[int]) -> str:
    """The response text: tokens under the mask, without the end-of-turn token."""
    kept = ids[mask.bool()].tolist()
    if kept and kept[-1] in stop_ids:
        kept = kept[:-1]
    return tokenizer.decode(kept, skip_special_tokens=True)


def use_engine(device: torch.device) -> bool:
    """Whether :func:`rollout` tries the engine on ``device`` (``RLI_ROLLOUT_ENGINE``, see above)."""
    mode = os.environ.get("RLI_ROLLOUT_ENGINE", "auto")
    if mode not in ("auto", "engine", "hf"):
        raise ValueError(f"RLI_ROLLOUT_ENGINE={mode!r}: use auto, engine or hf")
    if mode == "auto" and device.type != "cuda":
        _say_once("rollout engine: on the CPU rollouts use HF generate (RLI_ROLLOUT_ENGINE=engine runs the "
                  "engine's eager steps there)", logging.INFO)
    return mode == "engine" or (mode == "auto" and device.type == "cuda")


@torch.no_grad()
def rollout(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: SamplingConfig,
    seed: int | None = None,
    intervention: ContextManager | None = None,
) -> Rollout:
    """Sample one response per prompt from ``model`` as it is now (its current parameters).

    Args:
        seed: Seeds torch's generator right before sampling, so that a rollout depends only on the
            parameters, the prompts and this seed (exact resume, paired on/off comparisons).
        intervention: A context entered around the sampling (e.g. ``steering.prompt_length(P)``); the
            engine reads the interventions' state inside it.
    """
    stop_ids = stop_token_ids(model, tokenizer)
    start = time.perf_counter()
    response_ids = None
    with intervention or nullcontext():
        if use_engine(prompt_ids.device):
            from modules.engine import Unsupported, engine_for

            try:
                response_ids = engine_for(model).generate(
                    prompt_ids, prompt_mask, sampling.max_new_tokens, stop_ids, tokenizer.pad_token_id,
                    sampling.temperature, sampling.top_p, seed=seed).tokens
            except Unsupported as why:
                _say_once(f"rollout engine: {why}; sampling with HF generate instead")
        if response_ids is None:
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            response_ids = out[:, prompt_ids.shape[1] :]
    seconds = time.perf_counter() - start
    response_mask = response_mask_from_ids(response_ids, stop_ids)
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    texts = [decode_response(tokenizer, row, mask, stop_ids) for row, mask in zip(response_ids, response_mask)]
    return Rollout(prompts, prompt_ids, prompt_mask, response_ids, response_mask, texts, seconds)


def response_hidden_states(model: nn.Module, batch: Rollout) -> torch.Tensor:
    """Final hidden states (after the final norm) at the positions that predict response tokens.

    Returns [B, R, d]: entry ``[b, t]`` predicts ``batch.response_ids[b, t]`` (meaningless where the
    response mask is 0). Position ids follow the attention mask (as ``generate`` does with left
    padding), so the log-probs match the ones the tokens were sampled with.
    """
    input_ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    prompt_len = batch.prompt_ids.shape[1]
    return hidden[:, prompt_len - 1 : -1]  # position t predicts token t + 1


def teacher_forced_rollout(tokenizer, prompts: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           responses: list[str], records: list[dict] | None = None,
                           max_new_tokens: int | None = None) -> Rollout:
    """A rollout of *given* responses (e.g. rows of a precomputed-rewards file), ending in the
    end-of-turn token as a sampled reply would."""
    eos = tokenizer.eos_token_id
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in responses]
    if max_new_tokens is not None:
        rows = [ids[: max_new_tokens - 1] for ids in rows]
    rows = [ids + [eos] for ids in rows]
    width = max(len(ids) for ids in rows)
    response_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        response_ids[i, : len(ids)] = torch.tensor(ids)
        response_mask[i, : len(ids)] = 1
    device = prompt_ids.device
    return Rollout(list(prompts), prompt_ids, prompt_mask, response_ids.to(device), response_mask.to(device),
                   list(responses), 0.0, list(records or []))
