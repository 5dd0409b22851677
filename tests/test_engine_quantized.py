"""A 4-bit (bitsandbytes NF4) base inside the rollout engine, on the CPU (bitsandbytes' CPU kernels):
the engine runs the same de-quantize-then-linear as ``Linear4bit.forward``, so its logits equal a plain
forward through the 4-bit layers, with and without LoRA adapters over them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datamodules.prompts import encode_prompts
from modules.engine import RolloutEngine
from modules.engine.quantized import QuantizedGroup
from modules.models.adapters import LoRAPolicy
from modules.models.interventions import decoder_layers
from modules.models.loading import load_causal_lm
from modules.rollout import stop_token_ids
from tests.engine_helpers import PROMPTS, generate_args, plain_logits

bnb = pytest.importorskip("bitsandbytes")
TOL = dict(rtol=1e-4, atol=1e-4)


def quantize_decoder_linears(model: nn.Module) -> None:
    """Every projection of the decoder layers as an NF4 ``Linear4bit`` (double quantization, fp32
    compute), as ``load_in_4bit`` lays a model out."""
    for layer in decoder_layers(model):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    four_bit = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                                 compute_dtype=torch.float32, compress_statistics=True,
                                                 quant_type="nf4")
                    four_bit.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                                        compress_statistics=True, quant_type="nf4")
                    if child.bias is not None:
                        four_bit.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                    setattr(parent, name, four_bit.to("cpu"))


@pytest.fixture
def four_bit_model(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    quantize_decoder_linears(model)
    assert type(decoder_layers(model)[0].mlp.down_proj).__name__ == "Linear4bit"
    assert decoder_layers(model)[0].mlp.down_proj.weight.dtype == torch.uint8  # packed
    return model, tokenizer


def _quantized_groups(engine: RolloutEngine) -> list:
    return [g for layer in engine._projections for g in layer if isinstance(g, QuantizedGroup)]


def test_a_4bit_base_runs_inside_the_engine_with_the_logits_of_a_plain_forward(four_bit_model):
    model, tokenizer = four_bit_model
    batch = encode_prompts(tokenizer, PROMPTS)
    engine = RolloutEngine(model)
    out = engine.generate(**generate_args(model, tokenizer, batch, 8, greedy=True, keep_logits=True))
    assert len(_quantized_groups(engine)) == 4 * len(decoder_layers(model))  # q/k/v, gate/up, o, down
    with torch.no_grad():
        logits, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens,
                                    stop_token_ids(model, tokenizer))
        hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                            max_new_tokens=8, eos_token_id=stop_token_ids(model, tokenizer),
                            pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(out.logits[mask], logits[mask], **TOL)
    assert torch.equal(out.tokens, hf[:, batch.input_ids.shape[1]:])
    # every layer's group of one shape shares one scratch buffer
    assert len({g.scratch.data_ptr() for g in _quantized_groups(engine)}) <= 4


def test_lora_over_a_4bit_base_inside_the_engine_follows_updates(four_bit_model):
    model, tokenizer = four_bit_model
    lora = LoRAPolicy(model, r=4, alpha=8)
    policy = lora.model
    batch = encode_prompts(tokenizer, PROMPTS)
    stops = stop_token_ids(model, tokenizer)
    engine = RolloutEngine(policy)

    def check() -> torch.Tensor:
        out = engine.generate(**generate_args(policy, tokenizer, batch, 6, greedy=True, keep_logits=True))
        with torch.no_grad():
            logits, mask = plain_logits(policy, batch.input_ids, batch.attention_mask, out.tokens, stops)
        torch.testing.assert_close(out.logits[mask], logits[mask], **TOL)
        return out.logits

    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero: make the adapter act
    groups = None
    first = check()
    groups = _quantized_groups(engine)
    assert groups and all(g.lora_active for g in groups)
    with torch.no_grad():  # an "optimizer step": the next rollout sees the new adapter values
        for name, param in policy.named_parameters():
            if "lora_A" in name:
                param.mul_(2.0)
    second = check()
    assert (second - first).abs().max() > 1e-3
    with lora.base():  # adapters off: the bare 4-bit base
        base = check()
    assert (base - second).abs().max() > 1e-3
