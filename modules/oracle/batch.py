"""From data rows to what the oracle's rollout needs: prompts, placeholder positions and vectors.

A data row (see :mod:`datamodules.oracle_data`) holds a ``context`` the subject reads, a
``question`` for the oracle, a reference ``answer``, and optionally ``layer_percent``,
``positions`` or ``num_positions``. :func:`build_oracle_batch`:

1. picks each row's layer percent (the row's own, else one of ``layer_percents`` chosen by a seeded
   hash of the row's text, so a row always reads the same layer for a given seed);
2. tokenises the contexts as plain text (no chat template, no special tokens, as the public code's
   LatentQA and past-lens contexts) and picks the positions: the row's ``positions`` (negative
   counts from the end), else its last ``num_positions`` tokens (default ``num_positions``);
3. runs the subject once over all contexts (:func:`~modules.oracle.injection.extract_activations`);
4. renders the oracle prompts (:func:`~modules.oracle.format.encode_oracle_prompt`), left-pads them
   and shifts the placeholder positions by each row's padding.

:meth:`OracleBatch.repeat` repeats every row G times for GRPO's groups (rows of a group adjacent).

Where we depart from the public code's data pipeline (its datasets pick layers and positions
per dataset):

1. One layer per row, chosen by a seeded hash of the row (or given by the row), not drawn anew
   each time a row is used: the same row reads the same layer in every rollout of a run.
2. Positions default to the last ``num_positions`` context tokens; rows can name others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Sequence

import torch

from modules.errors import UserError
from modules.oracle.format import MAX_POSITIONS, encode_oracle_prompt, oracle_prefix
from modules.oracle.injection import extract_activations
from modules.oracle.scheme import DEFAULT_LAYER_PERCENTS, layers_for_percents


@dataclass
class OracleBatch:
    """Oracle prompts with the activations to inject into them (one row per sample)."""

    records: list[dict]
    """The data rows (context, question, answer, ...), one per row."""
    prompts: list[str]
    """The oracle's user message of each row (prefix + question), before the chat template."""
    input_ids: torch.Tensor
    """[B, P] left-padded prompt ids (chat template applied)."""
    attention_mask: torch.Tensor
    """[B, P]."""
    positions: torch.Tensor
    """[B, K] placeholder indices into ``input_ids``; -1 pads rows with fewer than K."""
    vectors: torch.Tensor
    """[B, K, d] the subject's activations to inject (zeros where ``positions`` is -1)."""
    layers: list[int]
    """The extraction layer of each row (also written in its prompt)."""
    layer_percents: list[float]

    def __len__(self) -> int:
        return len(self.records)

    def repeat(self, times: int) -> "OracleBatch":
        """Each row ``times`` times in a row (GRPO groups of ``times`` samples)."""
        def rep(items: list) -> list:
            return [x for x in items for _ in range(times)]

        return OracleBatch(rep(self.records), rep(self.prompts), self.input_ids.repeat_interleave(times, 0),
                           self.attention_mask.repeat_interleave(times, 0),
                           self.positions.repeat_interleave(times, 0), self.vectors.repeat_interleave(times, 0),
                           rep(self.layers), rep(self.layer_percents))

    @property
    def placeholders_from_end(self) -> torch.Tensor:
        """[B, K] distance of each placeholder from the end of the prompt (``P - position``; -1 unused).

        Unlike ``positions`` it survives adding or dropping left padding (``Rollout.select`` and
        ``Rollout.concat`` do); :func:`absolute_positions` turns it back for a prompt width.
        """
        width = self.input_ids.shape[1]
        return torch.where(self.positions >= 0, width - self.positions, torch.full_like(self.positions, -1))

    def select(self, rows: torch.Tensor | list[int]) -> "OracleBatch":
        """The given rows (prompt padding kept as it is)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        picked = index.tolist()
        return OracleBatch([self.records[i] for i in picked], [self.prompts[i] for i in picked],
                           self.input_ids[index], self.attention_mask[index], self.positions[index],
                           self.vectors[index], [self.layers[i] for i in picked],
                           [self.layer_percents[i] for i in picked])

    def tagged_records(self) -> list[dict]:
        """Copies of the rows carrying their injection (``_oracle_vectors`` [K, d] and
        ``_oracle_from_end`` [K]), so that it travels with ``Rollout.records`` through
        ``Rollout.select``/``concat``; :func:`injection_from_records` reads it back."""
        from_end = self.placeholders_from_end
        out = []
        for k, record in enumerate(self.records):
            keep = from_end[k] >= 0
            out.append({**record, VECTORS_KEY: self.vectors[k][keep], FROM_END_KEY: from_end[k][keep]})
        return out

    def to(self, device) -> "OracleBatch":
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       positions=self.positions.to(device), vectors=self.vectors.to(device))


VECTORS_KEY = "_oracle_vectors"
FROM_END_KEY = "_oracle_from_end"


def injection_from_records(records: list[dict], prompt_width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vectors [B, K, d], positions [B, K])`` for :meth:`ActivationInjection.inject` from rows made by
    :meth:`OracleBatch.tagged_records`, for left-padded prompts of width ``prompt_width``."""
    k = max(len(r[FROM_END_KEY]) for r in records)
    first = records[0][VECTORS_KEY]
    vectors = first.new_zeros(len(records), k, first.shape[-1])
    from_end = torch.full((len(records), k), -1, dtype=torch.long)
    for i, r in enumerate(records):
        n = len(r[FROM_END_KEY])
        vectors[i, :n] = r[VECTORS_KEY]
        from_end[i, :n] = r[FROM_END_KEY]
    positions = absolute_positions(from_end, prompt_width)
    return (vectors, positions) if device is None else (vectors.to(device), positions.to(device))


def absolute_positions(from_end: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """Placeholder indices for left-padded prompts of width ``prompt_width`` (-1 stays -1)."""
    return torch.where(from_end >= 0, prompt_width - from_end, torch.full_like(from_end, -1))


def choose_percent(record: dict, percents: Sequence[float], seed: int) -> float:
    """The row's ``layer_percent``, else a seeded choice from ``percents`` keyed by the row's text."""
    if record.get("layer_percent") is not None:
        return record["layer_percent"]
    rng = random.Random(f"{seed}\x00{record.get('context', '')}\x00{record.get('question', '')}")
    return rng.choice(list(percents))


def context_positions(record: dict, length: int, default_num_positions: int) -> list[int]:
    """Indices into the context's ``length`` tokens where activations are read."""
    if record.get("positions") is not None:
        raw = list(record["positions"])
        resolved = [p + length if p < 0 else p for p in raw]
        bad = [p for p, r in zip(raw, resolved) if not 0 <= r < length]
        if bad:
            raise UserError(f"positions {bad} are outside the context's {length} tokens "
                            f"(question: {record.get('question', '')[:60]!r})")
        if len(resolved) > MAX_POSITIONS:
            raise UserError(f"a row reads {len(resolved)} positions; the oracle takes at most {MAX_POSITIONS}")
        return resolved
    n = int(record.get("num_positions") or default_num_positions)
    n = max(1, min(n, length, MAX_POSITIONS))
    return list(range(length - n, length))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """[B, T] ids and mask, left-padded; and each row's padding (the shift of its indices)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pads = []
    for i, r in enumerate(rows):
        pad = width - len(r)
        ids[i, pad:] = torch.tensor(r, dtype=torch.long)
        mask[i, pad:] = 1
        pads.append(pad)
    return ids, mask, pads


def _padded_positions(rows: list[list[int]], pads: list[int]) -> torch.Tensor:
    k = max(len(r) for r in rows)
    out = torch.full((len(rows), k), -1, dtype=torch.long)
    for i, (r, pad) in enumerate(zip(rows, pads)):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long) + pad
    return out


def build_oracle_batch(
    model,
    tokenizer,
    records: list[dict],
    layer_percents: Sequence[float] = DEFAULT_LAYER_PERCENTS,
    num_positions: int = 8,
    system_prompt: str | None = None,
    seed: int = 0,
    subject: Callable[[], ContextManager] | None = None,
) -> OracleBatch:
    """Extract the rows' activations with the subject and build the oracle's prompts.

    Args:
        model: The shared model (peft-wrapped: the adapter is switched off for extraction).
        records: Data rows (``context``, ``question``, ``answer``, optional fields).
        layer_percents: Where rows without ``layer_percent`` read from (25/50/75 % by default).
        num_positions: Positions read where a row gives neither ``positions`` nor ``num_positions``.
        system_prompt: The format system prompt (None: no system turn, as the original oracles).
        seed: Seeds the choice of layer per row.
        subject: Context that makes ``model`` the subject (default: peft's ``disable_adapter``).
    """
    if not records:
        raise UserError("no oracle rows to build a batch from")
    percents = [choose_percent(r, layer_percents, seed) for r in records]
    layer_of = layers_for_percents(model, sorted(set(percents)))
    layers = [layer_of[p] for p in percents]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    contexts = [tokenizer(r["context"], add_special_tokens=False)["input_ids"] for r in records]
    if any(not c for c in contexts):
        raise UserError("an oracle row has an empty context")
    ctx_positions = [context_positions(r, len(c), num_positions) for r, c in zip(records, contexts)]
    ctx_ids, ctx_mask, ctx_pads = left_pad(contexts, pad_id)
    vectors = extract_activations(model, ctx_ids.to(device), ctx_mask.to(device), layers,
                                  _padded_positions(ctx_positions, ctx_pads).to(device), subject)

    encoded = [encode_oracle_prompt(tokenizer, r["question"], layer, len(pos), system_prompt)
               for r, layer, pos in zip(records, layers, ctx_positions)]
    ids, mask, pads = left_pad([e.input_ids for e in encoded], pad_id)
    positions = _padded_positions([e.positions for e in encoded], pads)
    prompts = [oracle_prefix(layer, len(pos)) + r["question"] for r, layer, pos in zip(records, layers, ctx_positions)]
    return OracleBatch(list(records), prompts, ids, mask, positions, vectors.cpu(), layers, percents)
