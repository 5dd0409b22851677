"""Shaping terms against hand values, their checks, and the density-ratio discriminator."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from modules.errors import UserError
from modules.sarm.discriminator import DensityRatioDiscriminator
from modules.sarm.shaping import (active, as_float_list, as_id_list, check_feature_ids, feature_thresholds,
                                  kl_penalty, shaped_reward, threshold_penalty)


def test_threshold_penalty_by_hand():
    z = torch.tensor([[0.0, 3.5, 1.0, 9.0],
                      [2.0, 0.5, 4.0, 0.0],
                      [2.1, 3.0, 0.0, 0.0]])
    features, taus, alphas = [0, 1, 2], [2.0, 3.0, 0.5], [0.1, 0.2, 0.4]
    # row 0: z1=3.5>3 (0.2), z2=1>0.5 (0.4) -> 0.6; row 1: z2=4>0.5 -> 0.4; row 2: z0=2.1>2 -> 0.1 (z1=3 is not > 3)
    assert torch.allclose(threshold_penalty(z, features, taus, alphas), torch.tensor([0.6, 0.4, 0.1]))
    assert active(z, features, taus).tolist() == [[False, True, True], [False, False, True], [True, False, False]]
    assert threshold_penalty(z, [], [], []).tolist() == [0.0, 0.0, 0.0]


def test_kl_penalty_and_total_by_hand():
    logits = torch.tensor([1.0, -0.5, 2.5])
    assert torch.allclose(kl_penalty(logits, 0.2), torch.tensor([0.2, -0.1, 0.5]))
    assert torch.allclose(kl_penalty(logits, 0.2, per_sample=False), torch.full((3,), 0.2))  # beta * mean
    total = shaped_reward(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.6, 0.0, 0.1]), kl_penalty(logits, 0.2))
    assert torch.allclose(total, torch.tensor([1.0 - 0.6 - 0.2, 2.0 - 0.0 + 0.1, 3.0 - 0.1 - 0.5]))
    assert torch.equal(shaped_reward(torch.tensor([1.5])), torch.tensor([1.5]))


def test_lists_and_their_checks():
    assert as_id_list("48659, 28879,26446") == [48659, 28879, 26446]
    assert as_id_list(7) == [7] and as_id_list(None) == []
    assert as_float_list("3.0,2.5") == [3.0, 2.5]
    assert feature_thresholds([1, 2, 3], [2.0], [0.1]) == ([1, 2, 3], [2.0] * 3, [0.1] * 3)  # one value for all
    with pytest.raises(UserError, match="tau_values has 2 entries but penalize_features has 3"):
        feature_thresholds([1, 2, 3], [2.0, 3.0], [0.1])
    with pytest.raises(UserError, match="alpha_values has 4 entries"):
        feature_thresholds([1, 2, 3], [2.0], [0.1, 0.1, 0.1, 0.1])
    with pytest.raises(UserError, match="without penalize_features"):
        feature_thresholds([], [1.0], [])
    with pytest.raises(UserError, match="lists a feature twice"):
        feature_thresholds([4, 4], [1.0], [0.1])
    with pytest.raises(UserError, match=r"\[65536\] are outside the SARM's 65536 latents"):
        check_feature_ids([3, 65536], 65536, "penalize_features")
    with pytest.raises(UserError, match="must be integers"):
        as_id_list("12,abc")


def _gaussians(n: int, dim: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g) + shift


def test_discriminator_separates_two_shifted_gaussians():
    dim, shift = 8, 0.5
    human, policy = _gaussians(4000, dim, shift, seed=0)
    disc = DensityRatioDiscriminator(dim, hidden=64, lr=3e-3, batch_size=256, seed=0)
    disc.fit_scaler(human)
    for _ in range(250):
        metrics = disc.train_step(human, policy)
    test_human, test_policy = _gaussians(4000, dim, shift, seed=1)
    with torch.no_grad():
        acc = 0.5 * ((disc.logits(test_human) < 0).float().mean() + (disc.logits(test_policy) > 0).float().mean())
    true_kl = dim * shift ** 2 / 2  # KL(N(mu, I) || N(0, I)) = |mu|^2 / 2 = 1.0
    estimate = disc.estimate_kl(test_policy)
    # Bayes accuracy: Phi(|mu| / 2) = Phi(0.707) = 0.76
    assert float(acc) > 0.72 and metrics["accuracy"] > 0.65
    assert abs(estimate - true_kl) < 0.35 * true_kl, estimate
    same = DensityRatioDiscriminator(dim, hidden=64, lr=3e-3, batch_size=256, seed=0)
    same.fit_scaler(human)
    for _ in range(200):
        same.train_step(human, test_human)  # the same distribution: nothing to tell apart
    assert abs(same.estimate_kl(test_human)) < 0.15


def test_discriminator_state_round_trips_exactly():
    human, policy = _gaussians(300, 5, 1.0, seed=2)
    disc = DensityRatioDiscriminator(5, hidden=16, lr=1e-2, batch_size=32, seed=3)
    disc.fit_scaler(human)
    for _ in range(5):
        disc.train_step(human, policy)
    state = copy.deepcopy(disc.state_dict())
    assert "_extra_state" in state and state["_extra_state"]["steps"] == 5

    resumed = DensityRatioDiscriminator(5, hidden=16, lr=1e-2, batch_size=32, seed=99)
    resumed.load_state_dict(state)
    continued = [disc.train_step(human, policy) for _ in range(5)]
    replayed = [resumed.train_step(human, policy) for _ in range(5)]
    assert continued == replayed  # same weights, Adam moments, sampling generator
    for a, b in zip(disc.state_dict().values(), resumed.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert resumed.steps == 10

    wrapper = torch.nn.Module()  # as a submodule of a larger module, the state still travels
    wrapper.disc = DensityRatioDiscriminator(5, hidden=16, lr=1e-2, batch_size=32, seed=0)
    wrapper.load_state_dict({f"disc.{k}": v for k, v in disc.state_dict().items()})
    assert wrapper.disc.steps == 10 and not math.isnan(wrapper.disc.estimate_kl(policy))
