"""The steering hook adds exactly alpha*v at its site and nowhere else; off restores the base model."""

import pytest
import torch
import torch.nn.functional as F

from datamodules.prompts import encode_prompts
from modules.errors import UserError
from modules.models.loading import load_causal_lm
from modules.models.steering import Steering, SteeringVector, decoder_layers
from modules.rollout import SamplingConfig, response_hidden_states, rollout

PROMPTS = ["I think the moon is made of cheese. Right?", "Hi", "My poem is perfect, isn't it? Say yes."]


def _capture(model, modules):
    """Record the outputs of ``modules`` during the next forward passes."""
    seen, handles = {}, []
    for name, module in modules.items():
        handles.append(module.register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, (o[0] if isinstance(o, tuple) else o).detach().clone())))
    return seen, handles


@pytest.mark.parametrize("hook_point,site_name", [("post_attn_norm", "post_attention_layernorm"),
                                                   ("pre_attn_norm", "input_layernorm"),
                                                   ("layer_output", "layer")])
def test_adds_exactly_alpha_v_at_the_site_and_nowhere_else(tiny_model_dir, hook_point, site_name):
    model, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    layers = decoder_layers(model)
    layer = 2
    sites = ("input_layernorm", "post_attention_layernorm", "layer")  # in the order they run
    watched = {f"{i}.{n}": layers[i] if n == "layer" else getattr(layers[i], n) for i in range(len(layers))
               for n in sites}
    seen, handles = _capture(model, watched)
    with torch.no_grad():
        base_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    base = dict(seen)

    vector = SteeringVector(model.config.hidden_size, alpha_init=0.5)
    with torch.no_grad():
        vector.v.copy_(torch.linspace(-1, 1, model.config.hidden_size))
    for handle in handles:
        handle.remove()
    steering = Steering(model, vector, layer, hook_point)
    seen, handles = _capture(model, watched)  # registered after the steering hook: sees its result
    with torch.no_grad():
        steered_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    steered = dict(seen)

    site = f"{layer}.{site_name}"
    # the site's output moved by exactly alpha * v, at every position
    torch.testing.assert_close(steered[site] - base[site], (0.5 * vector.v).expand_as(base[site]).detach(),
                               rtol=0, atol=1e-6)
    # everything computed before the site is untouched
    order = [f"{i}.{n}" for i in range(len(layers)) for n in sites]
    for name in order[: order.index(site)]:
        assert torch.equal(steered[name], base[name]), name
    # and the steering does change what comes after it
    assert not torch.allclose(steered_logits, base_logits)

    with torch.no_grad(), steering.disabled():
        off_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(off_logits, base_logits)
    assert steering.enabled  # the switch is back on after the context
    steering.remove()
    with torch.no_grad():
        removed_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(removed_logits, base_logits)
    for handle in handles:
        handle.remove()


def test_zero_vector_is_the_base_model(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    with torch.no_grad():
        base = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    Steering(model, SteeringVector(model.config.hidden_size), 1)
    with torch.no_grad():
        steered = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(base, steered)


@pytest.mark.parametrize("positions,last_k", [("all", 1), ("response", 1), ("last_k", 3)])
def test_generation_and_teacher_forcing_see_the_same_steering(tiny_model_dir, positions, last_k):
    """Logits while sampling equal the logits of the training forward pass, for every position rule.

    This also checks left padding and position ids: a mismatch would make the REINFORCE log-probs
    those of a different policy than the one that sampled.
    """
    model, tokenizer = load_causal_lm(tiny_model_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    vector = SteeringVector(model.config.hidden_size)
    with torch.no_grad():
        vector.v.normal_(0, 1.0)
    steering = Steering(model, vector, 1, "post_attn_norm", positions, last_k)
    P = batch.input_ids.shape[1]
    torch.manual_seed(3)
    with steering.prompt_length(P), torch.no_grad():
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=True, top_k=0,
                             max_new_tokens=6, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)
    sampled_logits = torch.stack(out.logits, 1)
    result = rollout(model, tokenizer, PROMPTS, batch.input_ids, batch.attention_mask, SamplingConfig(6), seed=3,
                     intervention=steering.prompt_length(P))
    mask = result.response_mask.bool()
    assert torch.equal(result.response_ids[mask], out.sequences[:, P:][mask])
    with steering.prompt_length(P), torch.no_grad():
        hidden = response_hidden_states(model, result)[mask]
    torch.testing.assert_close(F.linear(hidden, model.get_output_embeddings().weight), sampled_logits[mask],
                               rtol=0, atol=1e-4)


def test_response_positions_leave_the_prompt_alone(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    layer = decoder_layers(model)[1]
    seen, handles = _capture(model, {"site": layer.post_attention_layernorm})
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    base = seen["site"]
    for handle in handles:
        handle.remove()
    vector = SteeringVector(model.config.hidden_size, alpha_init=2.0)
    with torch.no_grad():
        vector.v.fill_(1.0)
    steering = Steering(model, vector, 1, "post_attn_norm", "last_k", last_k=2)
    seen, handles = _capture(model, {"site": layer.post_attention_layernorm})
    P = batch.input_ids.shape[1]
    with torch.no_grad(), steering.prompt_length(P):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    delta = seen["site"] - base
    assert torch.equal(delta[:, : P - 2], torch.zeros_like(delta[:, : P - 2]))
    torch.testing.assert_close(delta[:, P - 2 :], torch.full_like(delta[:, P - 2 :], 2.0))
    with pytest.raises(RuntimeError, match="prompt_length"):
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for handle in handles:
        handle.remove()


def test_bad_sites_are_refused(tiny_llama_dir):
    model, _ = load_causal_lm(tiny_llama_dir, "float32")
    vector = SteeringVector(model.config.hidden_size)
    with pytest.raises(UserError, match="out of range"):
        Steering(model, vector, 4)
    with pytest.raises(UserError, match="hook_point"):
        Steering(model, vector, 0, "mlp_out")


def test_gradient_reaches_only_v_and_alpha(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, "float32")
    batch = encode_prompts(tokenizer, PROMPTS)
    vector = SteeringVector(model.config.hidden_size, init_std=0.1)
    Steering(model, vector, 1)
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.sum().backward()
    assert vector.v.grad is not None and vector.alpha.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_alpha_is_1d_and_a_checkpoint_with_a_0d_alpha_still_loads(tiny_llama_dir):
    """alpha is (1,)-shaped (FSDP and DeepSpeed refuse 0-d parameters); a checkpoint written when it was
    0-d still loads into the module and its optimizer, and steps."""
    from tests.helpers import tiny_module

    vector = SteeringVector(4, alpha_init=2.0)
    assert vector.alpha.shape == (1,)
    vector.load_state_dict({"v": torch.ones(4), "alpha": torch.tensor(3.0)})
    assert vector.alpha.shape == (1,) and float(vector.alpha) == 3.0

    module = tiny_module(tiny_llama_dir)
    params = [module.steering_vector.v, module.steering_vector.alpha]
    old = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(p.shape or ())) for p in (params[0], torch.tensor(0.0))])
    for p in old.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    old.step()
    state = {"steering_vector.v": torch.ones_like(params[0]), "steering_vector.alpha": torch.tensor(0.5)}
    checkpoint = {"state_dict": state,
                  "optimizer_states": [old.state_dict()], "on_policy": {"rollout_batches_done": 1}}
    assert checkpoint["optimizer_states"][0]["state"][1]["exp_avg"].dim() == 0
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    assert float(module.steering_vector.alpha) == 0.5 and module.rollout_batches_done == 1
    optimizer = torch.optim.AdamW(params)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # a 0-d moment against a (1,) gradient would raise here
    assert optimizer.state[params[1]]["exp_avg"].shape == (1,)
