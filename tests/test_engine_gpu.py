"""The rollout engine on a GPU: captured decode steps (fused kernels) give the logits of a plain
forward, follow in-place updates of the steering vector and LoRA weights without a new capture,
reproduce a seed, and match HF generate's greedy tokens. Run through the device tool: pytest -m gpu."""

from __future__ import annotations

import pytest
import torch

from datamodules.prompts import encode_prompts
from modules.engine import RolloutEngine, engine_for
from modules.models.adapters import LoRAPolicy
from modules.models.loading import load_causal_lm
from modules.models.steering import Steering, SteeringVector
from modules.oracle.batch import build_oracle_batch
from modules.oracle.injection import ActivationInjection
from modules.rollout import SamplingConfig, rollout, stop_token_ids
from tests.engine_helpers import PROMPTS, generate_args, plain_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _steered(model_dir, dtype):
    model, tokenizer = load_causal_lm(model_dir, dtype, device="cuda")
    vector = SteeringVector(model.config.hidden_size, alpha_init=2.0).cuda()
    with torch.no_grad():
        vector.v.normal_(0, 1.0)
    steering = Steering(model, vector, 1, "post_attn_norm", "response")
    return model, tokenizer, vector, steering


def _acting_lora(model) -> LoRAPolicy:
    """A LoRA r=4 policy whose B matrices are not zero (a fresh adapter would change nothing)."""
    lora = LoRAPolicy(model, r=4, alpha=8)
    with torch.no_grad():
        for name, param in lora.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return lora


def test_greedy_graph_steps_equal_hf_generate_in_fp32(tiny_model_dir):
    model, tokenizer, _, steering = _steered(tiny_model_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS).to("cuda")
    P = batch.input_ids.shape[1]
    with steering.prompt_length(P):
        out = RolloutEngine(model).generate(**generate_args(model, tokenizer, batch, 40, greedy=True, keep_logits=True))
        hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                            max_new_tokens=40, eos_token_id=stop_token_ids(model, tokenizer),
                            pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
    assert out.graphs
    assert torch.equal(out.tokens, hf.sequences[:, P:])
    torch.testing.assert_close(out.logits, torch.stack(hf.logits, 1), rtol=0, atol=1e-4)


def test_graphs_read_steering_and_lora_in_place(tiny_model_dir):
    """fp32, so that a stale read (a difference of order 1) cannot hide in bf16 noise."""
    model, tokenizer, vector, steering = _steered(tiny_model_dir, "float32")
    lora = _acting_lora(model)
    policy = lora.model
    batch = encode_prompts(tokenizer, PROMPTS * 3).to("cuda")
    P = batch.input_ids.shape[1]
    stops = stop_token_ids(policy, tokenizer)
    engine = RolloutEngine(policy)

    def check():
        with steering.prompt_length(P):
            out = engine.generate(**generate_args(policy, tokenizer, batch, 70, seed=3, keep_logits=True))
            with torch.no_grad():
                logits, mask = plain_logits(policy, batch.input_ids, batch.attention_mask, out.tokens, stops)
        assert out.graphs
        torch.testing.assert_close(out.logits[mask], logits[mask], rtol=0, atol=1e-4)
        return out

    first = check()
    captures = engine.captures
    assert captures >= 2  # the cache grew past one block of columns
    with torch.no_grad():  # what an optimizer step does: in place
        vector.v.mul_(-1.0)
        for name, param in policy.named_parameters():
            if "lora_A" in name:
                param.mul_(2.0)
    second = check()
    assert engine.captures == captures
    assert (first.logits[:, 0] - second.logits[:, 0]).abs().max() > 0.1
    with lora.reference():  # a switch of adapters is another step: captured once
        check()
    assert engine.captures > captures


def test_a_seed_reproduces_a_graph_rollout_through_rollout(tiny_llama_dir):
    model, tokenizer, _, steering = _steered(tiny_llama_dir, "bfloat16")
    batch = encode_prompts(tokenizer, PROMPTS).to("cuda")
    P = batch.input_ids.shape[1]
    sampling = SamplingConfig(50, temperature=0.8, top_p=0.9)
    runs = [rollout(model, tokenizer, PROMPTS, batch.input_ids, batch.attention_mask, sampling, seed=s,
                    intervention=steering.prompt_length(P)) for s in (11, 11, 12)]
    assert engine_for(model).captures > 0  # the engine ran (RLI_ROLLOUT_ENGINE=auto on CUDA)
    assert torch.equal(runs[0].response_ids, runs[1].response_ids) and runs[0].responses == runs[1].responses
    assert not torch.equal(runs[0].response_ids, runs[2].response_ids)


def test_injection_on_the_gpu_in_bf16_is_as_close_to_a_plain_forward_as_hf_generate(tiny_qwen_dir):
    """bf16 tolerance, measured: the engine's logits are as close to a plain forward as HF
    generate's own logits are (both sample token by token against a cache)."""
    model, tokenizer = load_causal_lm(tiny_qwen_dir, "bfloat16", device="cuda")
    rows = [{"context": "The match ended two to one after a late goal.", "question": "What is it about?",
             "answer": "sports"},
            {"context": "I loved this film.", "question": "Positive or negative?", "answer": "positive"}]
    batch = build_oracle_batch(model, tokenizer, rows, num_positions=3).to("cuda")
    injection = ActivationInjection(model)
    stops = stop_token_ids(model, tokenizer)
    with injection.inject(batch.vectors, batch.positions):
        out = RolloutEngine(model).generate(prompt_ids=batch.input_ids, prompt_mask=batch.attention_mask,
                                            max_new_tokens=20, stop_ids=stops, pad_id=tokenizer.pad_token_id,
                                            greedy=True, keep_logits=True)
        assert out.graphs and injection.calls == 1
        hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                            max_new_tokens=20, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                            output_logits=True, return_dict_in_generate=True)
        hf_tokens = hf.sequences[:, batch.input_ids.shape[1]:]
        with torch.no_grad():
            logits, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens, stops)
            hf_plain, hf_mask = plain_logits(model, batch.input_ids, batch.attention_mask, hf_tokens, stops)
    ours = (out.logits[mask] - logits[mask]).abs().max()
    theirs = (torch.stack(hf.logits, 1).float()[hf_mask] - hf_plain[hf_mask]).abs().max()
    assert ours <= 2 * theirs + 1e-2, (float(ours), float(theirs))


def test_a_4bit_base_with_lora_runs_in_captured_graphs_that_follow_updates(tiny_model_dir):
    """load_in_4bit (NF4, double quantization, bf16 compute) with LoRA over it: the engine captures the
    decode step (no fallback to HF generate), and its logits are as close to a plain forward as HF
    generate's are."""
    model, tokenizer = load_causal_lm(tiny_model_dir, "bfloat16", device="cuda", load_in_4bit=True)
    lora = _acting_lora(model)
    policy = lora.model
    batch = encode_prompts(tokenizer, PROMPTS * 3).to("cuda")
    stops = stop_token_ids(policy, tokenizer)
    engine = RolloutEngine(policy)

    def check():
        out = engine.generate(**generate_args(policy, tokenizer, batch, 40, greedy=True, keep_logits=True))
        with torch.no_grad():
            logits, mask = plain_logits(policy, batch.input_ids, batch.attention_mask, out.tokens, stops)
            hf = policy.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                                 max_new_tokens=40, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                                 output_logits=True, return_dict_in_generate=True)
        assert out.graphs
        ours = (out.logits[mask] - logits[mask]).abs().max()
        width = min(out.logits.shape[1], len(hf.logits))
        theirs = (torch.stack(hf.logits, 1)[:, :width][mask[:, :width]] - logits[:, :width][mask[:, :width]]).abs().max()
        assert ours <= 2 * theirs + 0.05, (float(ours), float(theirs))
        return out

    first = check()
    captures = engine.captures
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_A" in name:
                param.mul_(2.0)
    second = check()
    assert engine.captures == captures  # an update is read in place
    assert (first.logits[:, 0] - second.logits[:, 0]).abs().max() > 0.1
