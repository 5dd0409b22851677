"""Starting a forward at the steered layer from the reference pass's record gives the full
forward's hidden states, loss and gradient exactly (modules/models/layer_input.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import loss_of, tiny_module
from modules.models.layer_input import recording_layer_input, starting_at_layer
from modules.models.steering import decoder_layers
from modules.rewards import Rewards
from modules.rollout import Rollout, response_hidden_states


def _rollout() -> Rollout:
    prompt_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])  # left padding
    return Rollout(["a", "b", "c"], prompt_ids, (prompt_ids != 0).long(),
                   torch.tensor([[20, 21, 22, 2], [23, 24, 0, 0], [25, 26, 27, 28]]),
                   torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]), ["x", "y", "z"])


def _steered(model_dir, **overrides):
    module = tiny_module(model_dir, kl_coef=0.3, hook_layer=2, use_reward_normalization=False, **overrides)
    with torch.no_grad():
        module.steering_vector.v.copy_(torch.sin(torch.arange(module.steering_vector.v.numel()).float()) * 2.0)
        module.steering_vector.alpha.fill_(1.5)
    return module


ON_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("hook_point,positions,estimator", [("post_attn_norm", "all", "exact"),
                                                            ("pre_attn_norm", "response", "reward")])
def test_loss_and_gradient_are_the_full_forwards(tiny_model_dir, hook_point, positions, estimator, device):
    dtype = "float32" if device == "cpu" else "bfloat16"  # bf16 on the GPU: its kernels, its roundings
    module = _steered(tiny_model_dir, hook_point=hook_point, steer_positions=positions, kl_estimator=estimator,
                      dtype=dtype).to(device)
    rollout = _rollout()
    rollout = Rollout(rollout.prompts, *(t.to(device) for t in (rollout.prompt_ids, rollout.prompt_mask,
                                                                 rollout.response_ids, rollout.response_mask)),
                      rollout.responses)
    rewards = Rewards(torch.tensor([1.0, -0.5, 2.0]), torch.tensor([True] * 3))

    lowest_mlp_runs = []
    decoder_layers(module.policy)[0].mlp.register_forward_hook(lambda *a: lowest_mlp_runs.append(1))

    def loss_and_grads(share: bool):
        module.share_lower_layers = share
        module.steering_vector.zero_grad()
        lowest_mlp_runs.clear()
        loss, metrics = loss_of(module, rollout, rewards)
        loss.backward()
        return (loss.detach(), metrics["kl/seq"], module.steering_vector.v.grad.clone(),
                module.steering_vector.alpha.grad.clone(), len(lowest_mlp_runs))

    shared, full = loss_and_grads(True), loss_and_grads(False)
    # shared: layer 0 ran in the reference pass only (the `reward` estimator adds a policy pass to the score)
    assert (shared[-1], full[-1]) == (1, 2 if estimator == "exact" else 3)
    assert full[1] != 0 and full[2].norm() > 0  # the vector changes the policy: there is something to compare
    for a, b in zip(shared[:-1], full[:-1]):
        assert torch.equal(a, b)


def test_starting_at_layer_skips_the_lower_layers_and_restores_them(tiny_llama_dir):
    module = _steered(tiny_llama_dir)
    model, batch, layers = module.policy, _rollout(), decoder_layers(module.policy)
    with torch.no_grad():
        with recording_layer_input(model, 2) as entering:
            full = response_hidden_states(model, batch)
        assert len(entering) == 1 and entering[0].shape == (3, 9, 64)
        with starting_at_layer(model, 2, entering[0]):
            started = response_hidden_states(model, batch)
        assert torch.equal(started, full)
        # the skipped layers' own forwards do not run; a record of other numbers changes the result
        layer_0_ran = []
        probe = layers[0].mlp.register_forward_hook(lambda *a: layer_0_ran.append(1))
        with starting_at_layer(model, 2, entering[0] + 1.0):
            assert not torch.equal(response_hidden_states(model, batch), full)
        assert not layer_0_ran
        probe.remove()
        # restored: a plain forward runs every layer again
        with recording_layer_input(model, 2) as again:
            assert torch.equal(response_hidden_states(model, batch), full)
        assert "forward" not in layers[0].__dict__ and torch.equal(again[0], entering[0])


def test_a_record_of_other_tokens_is_refused(tiny_llama_dir):
    module = _steered(tiny_llama_dir)
    batch = _rollout()
    with pytest.raises(ValueError, match="record it over the same tokens"):
        with starting_at_layer(module.policy, 2, torch.zeros(3, 7, 64)), torch.no_grad():
            response_hidden_states(module.policy, batch)
