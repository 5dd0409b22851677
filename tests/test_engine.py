"""The rollout engine (CPU, eager steps): the same tokens and logits as HF generate and as a plain
forward, with steering, LoRA and the oracle's injection inside; EOS, padding, seeds, fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from datamodules.prompts import encode_prompts
from modules.engine import RolloutEngine, Unsupported
from modules.engine.kernels import sample_tokens
from modules.models.adapters import LoRAPolicy
from modules.models.loading import load_causal_lm
from modules.models.steering import Steering, SteeringVector
from modules.oracle.batch import build_oracle_batch
from modules.oracle.injection import ActivationInjection
from modules.rollout import SamplingConfig, rollout, stop_token_ids
from tests.engine_helpers import PROMPTS, generate_args, plain_logits

TOL = dict(rtol=0, atol=1e-5)


def _hf_greedy(model, tokenizer, batch, max_new, stops=None):
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                         max_new_tokens=max_new, eos_token_id=stops or stop_token_ids(model, tokenizer),
                         pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, batch.input_ids.shape[1]:], torch.stack(out.logits, 1)


def test_greedy_tokens_and_logits_equal_hf_generate(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    out = RolloutEngine(model).generate(**generate_args(model, tokenizer, batch, 12, greedy=True, keep_logits=True))
    tokens, logits = _hf_greedy(model, tokenizer, batch, 12)
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logits, logits, **TOL)
    assert not out.graphs


def test_a_seed_reproduces_a_rollout_and_another_seed_differs(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    engine = RolloutEngine(model)
    first = engine.generate(**generate_args(model, tokenizer, batch, 16, seed=7)).tokens
    torch.rand(5)  # whatever ran in between
    again = engine.generate(**generate_args(model, tokenizer, batch, 16, seed=7)).tokens
    other = engine.generate(**generate_args(model, tokenizer, batch, 16, seed=8)).tokens
    assert torch.equal(first, again)
    assert not torch.equal(first[:, : other.shape[1]], other[:, : first.shape[1]])


@pytest.mark.parametrize("hook_point", ["post_attn_norm", "pre_attn_norm", "layer_output"])
@pytest.mark.parametrize("positions,last_k", [("all", 1), ("response", 1), ("last_k", 3)])
def test_steering_inside_the_engine_gives_the_logits_of_a_plain_forward(tiny_model_dir, hook_point, positions, last_k):
    model, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    vector = SteeringVector(model.config.hidden_size, alpha_init=1.5)
    with torch.no_grad():
        vector.v.normal_(0, 1.0)
    steering = Steering(model, vector, 1, hook_point, positions, last_k)
    P = batch.input_ids.shape[1]
    stops = stop_token_ids(model, tokenizer)
    with steering.prompt_length(P):
        out = RolloutEngine(model).generate(**generate_args(model, tokenizer, batch, 10, seed=1, keep_logits=True))
        with torch.no_grad():
            logits, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens, stops)
    torch.testing.assert_close(out.logits[mask], logits[mask], **TOL)
    with torch.no_grad(), steering.disabled():  # the steering did act
        unsteered, _ = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens, stops)
    assert (unsteered[mask] - logits[mask]).abs().max() > 1e-2
    with steering.disabled():  # off inside the engine: the base model, as HF generate sees it
        off = RolloutEngine(model).generate(**generate_args(model, tokenizer, batch, 10, greedy=True, keep_logits=True))
        base_tokens, base_logits = _hf_greedy(model, tokenizer, batch, 10)
    assert torch.equal(off.tokens, base_tokens)
    torch.testing.assert_close(off.logits, base_logits, **TOL)


def test_steering_without_prompt_length_is_refused_like_the_hook(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    Steering(model, SteeringVector(model.config.hidden_size), 1, positions="response")
    with pytest.raises(RuntimeError, match="prompt_length"):
        RolloutEngine(model).generate(**generate_args(model, tokenizer, batch, 4))


def test_lora_inside_the_engine_gives_the_logits_of_a_plain_forward(tiny_model_dir):
    base, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    lora = LoRAPolicy(base, r=4, alpha=8)
    model = lora.model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)  # a fresh adapter is the identity; make it act
    batch = encode_prompts(tokenizer, PROMPTS)
    stops = stop_token_ids(model, tokenizer)
    engine = RolloutEngine(model)

    def check():
        out = engine.generate(**generate_args(model, tokenizer, batch, 8, seed=2, keep_logits=True))
        with torch.no_grad():
            logits, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens, stops)
        torch.testing.assert_close(out.logits[mask], logits[mask], **TOL)
        return out.logits[mask]

    adapted = check()
    with lora.reference():  # the adapter switched off: the base model
        reference = check()
    assert (adapted - reference).abs().max() > 1e-2
    with torch.no_grad():  # an optimizer step changes the weights in place
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.mul_(2.0)
    check()


@pytest.mark.parametrize("kind", ["llama", "qwen"])
def test_injection_inside_the_engine_gives_the_logits_of_a_plain_forward(kind, tiny_llama_dir, tiny_qwen_dir):
    model, tokenizer = load_causal_lm({"llama": tiny_llama_dir, "qwen": tiny_qwen_dir}[kind], "float32")
    rows = [{"context": "The match ended two to one after a late goal.", "question": "What is it about?",
             "answer": "sports"},
            {"context": "I loved this film.", "question": "Positive or negative?", "answer": "positive",
             "positions": [0, -1]}]
    batch = build_oracle_batch(model, tokenizer, rows, num_positions=3)
    injection = ActivationInjection(model)
    stops = stop_token_ids(model, tokenizer)
    args = dict(prompt_ids=batch.input_ids, prompt_mask=batch.attention_mask, max_new_tokens=8, stop_ids=stops,
                pad_id=tokenizer.pad_token_id, greedy=True, keep_logits=True)
    with injection.inject(batch.vectors, batch.positions):
        out = RolloutEngine(model).generate(**args)
        assert injection.calls == 1  # the prompt pass only
        with torch.no_grad():
            logits, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens, stops)
        hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                            max_new_tokens=8, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(out.logits[mask], logits[mask], **TOL)
    assert torch.equal(out.tokens, hf[:, batch.input_ids.shape[1]:])
    plain = RolloutEngine(model).generate(**args)  # outside inject(): no injection
    assert (plain.logits[:, 0] - out.logits[:, 0]).abs().max() > 1e-3


def test_rows_stop_at_their_own_stop_token_and_padding_does_not_leak(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    engine = RolloutEngine(model)
    pad = tokenizer.pad_token_id
    free = engine.generate(**generate_args(model, tokenizer, batch, 12, seed=4)).tokens
    stop = int(free[0, 2])  # row 0 stops at its third token; other rows where they draw it, if they do
    args = generate_args(model, tokenizer, batch, 12, seed=4)
    args["stop_ids"] = [stop]
    out = engine.generate(**args).tokens
    expected, widths = free.clone(), []
    for row in expected:  # the same draws, each row cut after its first stop token
        hits = (row == stop).nonzero()
        if len(hits):
            row[int(hits[0]) + 1:] = pad
        widths.append(int(hits[0]) + 1 if len(hits) else len(row))
    assert out[0, 2] == stop and (out[0, 3:] == pad).all()
    assert torch.equal(out, expected[:, : max(widths)])
    # a row's logits do not depend on the left padding that the longer rows force on it
    alone = encode_prompts(tokenizer, PROMPTS[1:2])
    assert alone.input_ids.shape[1] < batch.input_ids.shape[1]
    single = engine.generate(**generate_args(model, tokenizer, alone, 6, greedy=True, keep_logits=True))
    batched = engine.generate(**generate_args(model, tokenizer, batch, 6, greedy=True, keep_logits=True))
    assert torch.equal(single.tokens[0], batched.tokens[1])
    torch.testing.assert_close(single.logits[0], batched.logits[1], **TOL)


def test_the_loop_ends_when_every_row_has_stopped(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    engine = RolloutEngine(model)
    free = engine.generate(**generate_args(model, tokenizer, batch, 20, seed=0)).tokens
    stops = sorted({int(t) for t in free[:, 9]})  # every row stops by its tenth token
    args = generate_args(model, tokenizer, batch, 40, seed=0)
    args["stop_ids"] = stops
    out = engine.generate(**args).tokens
    assert out.shape[1] <= 10 and torch.equal(out[:, :9][out[:, :9] != tokenizer.pad_token_id],
                                              free[:, :9][out[:, :9] != tokenizer.pad_token_id])
    greedy = engine.generate(**generate_args(model, tokenizer, batch, 4, greedy=True)).tokens
    stops = sorted({int(t) for t in greedy[:, 0]})  # greedy: every row stops at once, as in HF generate
    args = generate_args(model, tokenizer, batch, 40, greedy=True)
    args["stop_ids"] = stops
    hf_tokens, _ = _hf_greedy(model, tokenizer, batch, 40, stops)
    assert torch.equal(engine.generate(**args).tokens, hf_tokens)


def test_the_sampler_draws_from_the_softmax_after_temperature_and_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(40_000, 1)
    temperature, top_p = torch.tensor([0.7]), torch.tensor([1.0])
    drawn = sample_tokens(logits, temperature, top_p, greedy=False, use_top_p=False)
    freq = torch.bincount(drawn, minlength=5).float() / len(drawn)
    expected = (logits[0] / 0.7).softmax(-1)
    assert (freq - expected).abs().max() < 0.01  # 4 standard errors at most
    # top-p 0.8 keeps the smallest set of tokens holding 80 % (HF's rule): here the first two
    drawn = sample_tokens(logits, temperature, torch.tensor([0.8]), greedy=False, use_top_p=True)
    kept = (logits[0, :2] / 0.7).softmax(-1)
    freq = torch.bincount(drawn, minlength=5).float() / len(drawn)
    assert freq[2:].sum() == 0 and (freq[:2] - kept).abs().max() < 0.01


def test_unknown_hooks_and_architectures_fall_back_to_hf_generate_and_say_so_once(tiny_llama_dir, caplog,
                                                                                   monkeypatch):
    monkeypatch.setenv("RLI_ROLLOUT_ENGINE", "engine")
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    with pytest.raises(Unsupported, match="unknown forward hook"):
        handle = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * 2)
        RolloutEngine(model).check()
    with caplog.at_level(logging.WARNING, logger="modules.rollout"):
        first = rollout(model, tokenizer, PROMPTS, batch.input_ids, batch.attention_mask, SamplingConfig(6), seed=3)
        rollout(model, tokenizer, PROMPTS, batch.input_ids, batch.attention_mask, SamplingConfig(6), seed=3)
    said = [r for r in caplog.records if "unknown forward hook" in r.getMessage()]
    assert len(said) == 1 and "HF generate" in said[0].getMessage()
    handle.remove()
    torch.manual_seed(3)  # the fallback is HF generate itself, hook and all
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * 2)
    hf = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=True, top_k=0,
                        max_new_tokens=6, eos_token_id=stop_token_ids(model, tokenizer),
                        pad_token_id=tokenizer.pad_token_id)
    handle.remove()
    width = first.response_ids.shape[1]
    mask = first.response_mask.bool()
    assert torch.equal(first.response_ids[mask], hf[:, batch.input_ids.shape[1]:][:, :width][mask])

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer))).eval()
    with pytest.raises(Unsupported, match="architecture 'gpt2'"):
        RolloutEngine(gpt2).check()
    model.generation_config.repetition_penalty = 1.3  # HF generate would sample from something else
    with pytest.raises(Unsupported, match="repetition_penalty"):
        RolloutEngine(model).check()


def test_rollout_through_the_engine_samples_what_the_training_pass_scores(tiny_model_dir, monkeypatch):
    """The REINFORCE log-probs must be those of the policy that sampled: the rollout's tokens,
    teacher-forced with the steering on, give the logits the engine drew them from."""
    monkeypatch.setenv("RLI_ROLLOUT_ENGINE", "engine")
    model, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    vector = SteeringVector(model.config.hidden_size)
    with torch.no_grad():
        vector.v.normal_(0, 1.0)
    steering = Steering(model, vector, 2, "post_attn_norm", "response")
    P = batch.input_ids.shape[1]
    sampling = SamplingConfig(8, temperature=0.7, top_p=0.9)
    out = rollout(model, tokenizer, PROMPTS, batch.input_ids, batch.attention_mask, sampling, seed=5,
                  intervention=steering.prompt_length(P))
    again = rollout(model, tokenizer, PROMPTS, batch.input_ids, batch.attention_mask, sampling, seed=5,
                    intervention=steering.prompt_length(P))
    assert torch.equal(out.response_ids, again.response_ids) and out.responses == again.responses
    with steering.prompt_length(P):
        engine_out = RolloutEngine(model).generate(**generate_args(
            model, tokenizer, batch, 8, temperature=0.7, top_p=0.9, seed=5, keep_logits=True))
        with torch.no_grad():
            logits, mask = plain_logits(model, batch.input_ids, batch.attention_mask, engine_out.tokens,
                                        stop_token_ids(model, tokenizer))
    assert torch.equal(engine_out.tokens[:, : out.response_ids.shape[1]][out.response_mask.bool()],
                       out.response_ids[out.response_mask.bool()])
    torch.testing.assert_close(engine_out.logits[mask], logits[mask], **TOL)


def test_fused_projections_are_views_of_one_buffer_and_follow_the_weights(tiny_model_dir, tmp_path):
    model, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = RolloutEngine(model)
    fused = engine.generate(**generate_args(model, tokenizer, batch, 10, greedy=True, keep_logits=True))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv, gate_up, out_proj, down = engine._projections[0]
    assert out_proj is None and down is None  # a lone plain linear is not worth fusing
    # one buffer, each weight a view of its rows; the values and every other weight untouched
    assert qkv.members == (attn.q_proj, attn.k_proj, attn.v_proj) and gate_up.members == (mlp.gate_proj, mlp.up_proj)
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_proj.weight.untyped_storage().data_ptr()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    unfused_model, _ = load_causal_lm(tiny_model_dir, "float32")
    unfused = RolloutEngine(unfused_model, fuse_projections=False).generate(
        **generate_args(unfused_model, tokenizer, batch, 10, greedy=True, keep_logits=True))
    assert unfused_model.model.layers[0].self_attn.k_proj.weight.untyped_storage().data_ptr() != \
        unfused_model.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr()
    assert torch.equal(fused.tokens, unfused.tokens)
    torch.testing.assert_close(fused.logits, unfused.logits, **TOL)

    # load_state_dict writes through the views: the engine reads the new weights in place
    torch.manual_seed(3)
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in before.items()}
    model.load_state_dict(new)
    assert qkv.intact() and gate_up.intact()
    out = engine.generate(**generate_args(model, tokenizer, batch, 10, greedy=True, keep_logits=True))
    expected, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens,
                                  stop_token_ids(model, tokenizer))
    torch.testing.assert_close(out.logits[mask], expected[mask], **TOL)
    assert not torch.allclose(out.logits[:, 0], fused.logits[:, 0])

    # a new weight tensor (.to(), a reload) breaks the views: the engine notices and fuses again
    model.to(torch.float64)
    assert not qkv.intact()
    out = engine.generate(**generate_args(model, tokenizer, batch, 10, greedy=True, keep_logits=True))
    assert engine._projections[0].qkv is not qkv and engine._projections[0].qkv.intact()
    expected, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens,
                                  stop_token_ids(model, tokenizer))
    torch.testing.assert_close(out.logits[mask], expected[mask], **TOL)

    # the fused model saves and loads as any other
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded, _ = load_causal_lm(str(tmp_path / "saved"), "float32")
    assert all(torch.equal(v.float(), reloaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_trainable_projections_are_not_fused_and_lora_layers_are_fused_with_their_adapters(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    policy = LoRAPolicy(model, r=4, target_modules=["gate_proj", "o_proj"])
    policy.model.get_base_model().model.layers[0].self_attn.k_proj.weight.requires_grad_(True)
    engine = RolloutEngine(policy.model)
    engine.generate(**generate_args(policy.model, tokenizer, encode_prompts(tokenizer, PROMPTS), 4, greedy=True))
    layer0, layer1 = engine._projections[0], engine._projections[1]
    assert layer0.qkv is None  # k trainable
    assert layer1.qkv is not None and not layer1.qkv.adapters  # plain q/k/v
    mlp = policy.model.get_base_model().model.layers[1].mlp
    assert layer1.gate_up.owners == (mlp.gate_proj, mlp.up_proj) and layer1.gate_up.members[0] is mlp.gate_proj.base_layer
    assert [(a.member, a.adapter, a.rank) for a in layer1.gate_up.adapters] == [(0, "default", 4)]
    assert layer1.out is not None and layer1.down is None  # o_proj has an adapter; down_proj is plain


def test_fuse_with_biases_gives_the_separate_outputs_and_refuses_what_it_cannot_stack():
    from torch import nn

    from modules.engine.fusion import fuse

    torch.manual_seed(0)
    layers = [nn.Linear(6, n, bias=True).requires_grad_(False) for n in (4, 2, 2)]
    x = torch.randn(3, 6)
    separate = [layer(x) for layer in layers]
    fused = fuse(*layers)
    assert fused is not None and fused.intact() and fused.sizes == (4, 2, 2)
    for out, expected in zip(fused(x), separate):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert layers[1].bias.data_ptr() == fused.bias.data_ptr() + 4 * 4  # rows 4-5 of the stacked bias
    layers[2].bias = nn.Parameter(torch.zeros(2), requires_grad=False)  # a new tensor: no longer a view
    assert not fused.intact()
    mixed = [nn.Linear(6, 2, bias=True).requires_grad_(False), nn.Linear(6, 2, bias=False).requires_grad_(False)]
    assert fuse(*mixed) is None  # one with a bias, one without
    assert fuse(layers[0], layers[0]) is None  # the same layer twice
    assert fuse(nn.Linear(6, 2), nn.Linear(6, 2)) is None  # trainable


def test_lora_groups_follow_updates_and_switches_and_leave_the_base_bit_identical(tiny_model_dir, tmp_path):
    """A policy with a frozen reference copy (two adapters per layer) and LoRA on only some projections:
    the engine's logits equal a plain forward for the policy, the reference and the bare base, after
    each of several in-place updates, and the base weights never change."""
    base, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    start = LoRAPolicy(base, r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in start.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    start.model.save_pretrained(tmp_path / "adapter")
    base, _ = load_causal_lm(tiny_model_dir, "float32")
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoRAPolicy(base, adapter_path=str(tmp_path / "adapter"))
    model, engine = lora.model, RolloutEngine(lora.model)
    batch = encode_prompts(tokenizer, PROMPTS)
    stops = stop_token_ids(model, tokenizer)

    def check():
        out = engine.generate(**generate_args(model, tokenizer, batch, 8, seed=2, keep_logits=True))
        with torch.no_grad():
            logits, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens, stops)
        torch.testing.assert_close(out.logits[mask], logits[mask], **TOL)
        return out.logits[:, 0]

    first = check()
    group = engine._projections[0].qkv
    assert [(a.member, a.adapter) for a in group.adapters] == [(0, "default"), (0, "reference"), (2, "default"),
                                                               (2, "reference")]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for update in range(3):  # in-place updates, as AdamW makes them
        with torch.no_grad():
            for param in trainable:
                param.add_(0.2 * torch.randn_like(param))
        policy = check()
        assert (policy - first).abs().max() > 1e-3
        with lora.reference():
            torch.testing.assert_close(check(), first, **TOL)  # the frozen starting adapter
        with lora.base():
            check()
    assert engine._projections[0].qkv is group  # updates and switches need no new fusing
    after = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert after.keys() == frozen.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)  # bit-identical


def _prompt_pass_rows(monkeypatch) -> list[int]:
    """Record the rows of each prompt pass (the engine refuses foreign hooks, so not through a hook)."""
    import modules.engine.engine as engine_module

    seen, choose = [], engine_module.shared_prompt_rows

    def recording(ids, mask, injections):
        rows, source = choose(ids, mask, injections)
        seen.append(len(ids) if rows is None else len(rows))
        return rows, source

    monkeypatch.setattr(engine_module, "shared_prompt_rows", recording)
    return seen


@pytest.mark.parametrize("greedy", [True, False])
def test_the_samples_of_one_prompt_share_one_prompt_pass(tiny_model_dir, greedy, monkeypatch):
    model, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[0]]  # runs of 3, 2 and 1 equal rows
    batch = encode_prompts(tokenizer, prompts)
    vector = SteeringVector(model.config.hidden_size, alpha_init=1.0)
    with torch.no_grad():
        vector.v.normal_(0, 1.0)
    steering = Steering(model, vector, 1, "layer_output", "response")
    passes = _prompt_pass_rows(monkeypatch)
    stops = stop_token_ids(model, tokenizer)
    with steering.prompt_length(batch.input_ids.shape[1]):
        out = RolloutEngine(model).generate(**generate_args(model, tokenizer, batch, 10, seed=3, greedy=greedy,
                                                            keep_logits=True))
        assert passes[0] == 3  # one row per run
        with torch.no_grad():
            logits, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens, stops)
    torch.testing.assert_close(out.logits[mask], logits[mask], **TOL)
    if greedy:  # equal rows, equal tokens
        assert torch.equal(out.tokens[0], out.tokens[1]) and torch.equal(out.tokens[3], out.tokens[4])
    else:  # each row still draws its own tokens
        assert not torch.equal(out.tokens[0], out.tokens[1])
    with steering.prompt_length(batch.input_ids.shape[1]):  # switched off: a pass over every row, same tokens
        unshared = RolloutEngine(model, share_prompt_pass=False).generate(
            **generate_args(model, tokenizer, batch, 10, seed=3, greedy=greedy, keep_logits=True))
        assert len(passes) == 1  # no run of rows looked for
    assert torch.equal(unshared.tokens, out.tokens)
    torch.testing.assert_close(unshared.logits[mask], out.logits[mask], **TOL)


def test_rows_with_equal_prompts_but_other_injections_do_not_share_a_prompt_pass(tiny_llama_dir, monkeypatch):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    row = {"context": "I loved this film.", "question": "Positive or negative?", "answer": "positive"}
    batch = build_oracle_batch(model, tokenizer, [row, row, row], num_positions=3)
    vectors = batch.vectors.clone()
    vectors[2] += 1.0  # the third row injects other activations into the same prompt
    injection = ActivationInjection(model)
    passes = _prompt_pass_rows(monkeypatch)
    stops = stop_token_ids(model, tokenizer)
    with injection.inject(vectors, batch.positions):
        out = RolloutEngine(model).generate(prompt_ids=batch.input_ids, prompt_mask=batch.attention_mask,
                                            max_new_tokens=6, stop_ids=stops, pad_id=tokenizer.pad_token_id,
                                            greedy=True, keep_logits=True)
        with torch.no_grad():
            logits, mask = plain_logits(model, batch.input_ids, batch.attention_mask, out.tokens, stops)
    assert passes[0] == 2
    torch.testing.assert_close(out.logits[mask], logits[mask], **TOL)
    assert (out.logits[1, 0] - out.logits[2, 0]).abs().max() > 1e-4
