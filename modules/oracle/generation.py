"""The oracle answering: sampled rollouts (through :func:`modules.rollout.rollout`) and greedy answers.

Both run the model as it is (adapter state untouched) with the injection on for the one
``generate`` call: the prompt pass is injected, the cached decoding steps are not.
"""

from __future__ import annotations

import torch

from modules.oracle.batch import OracleBatch
from modules.oracle.injection import ActivationInjection
from modules.rollout import Rollout, SamplingConfig, decode_response, response_mask_from_ids, rollout, stop_token_ids


def oracle_rollout(model, tokenizer, batch: OracleBatch, injection: ActivationInjection, sampling: SamplingConfig,
                   seed: int | None = None) -> Rollout:
    """One sampled reply per row of ``batch`` (repeat the batch for G per prompt); records attached."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    out = rollout(model, tokenizer, batch.prompts, batch.input_ids, batch.attention_mask, sampling, seed,
                  intervention=injection.inject(batch.vectors, batch.positions))
    out.records = list(batch.records)
    return out


@torch.no_grad()
def greedy_answers(model, tokenizer, batch: OracleBatch, injection: ActivationInjection,
                   max_new_tokens: int = 24) -> list[str]:
    """The oracle's greedy reply to each row (the public code's default generation, do_sample=False)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    stops = stop_token_ids(model, tokenizer)
    with injection.inject(batch.vectors, batch.positions):
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    ids = out[:, batch.input_ids.shape[1]:]
    mask = response_mask_from_ids(ids, stops)
    return [decode_response(tokenizer, row, m, stops) for row, m in zip(ids, mask)]
