"""Helpers of the rollout-engine tests (a test helper, not a test file)."""

from __future__ import annotations

import torch

from modules.rollout import Rollout, response_hidden_states, response_mask_from_ids, stop_token_ids

PROMPTS = ["I think the moon is made of cheese. Right?", "Hi", "My poem is perfect, isn't it? Say yes."]


def plain_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
                 stops: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a plain teacher-forced forward that predict ``tokens`` [B, R], and the response mask
    (each row up to and including its first stop token)."""
    mask = response_mask_from_ids(tokens, stops)
    batch = Rollout([""] * len(tokens), prompt_ids, prompt_mask, tokens, mask, [""] * len(tokens))
    hidden = response_hidden_states(model, batch)
    return model.get_output_embeddings()(hidden).float(), mask.bool()


def generate_args(model, tokenizer, batch, max_new: int = 8, **kwargs) -> dict:
    return dict(prompt_ids=batch.input_ids, prompt_mask=batch.attention_mask, max_new_tokens=max_new,
                stop_ids=stop_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id, **kwargs)
