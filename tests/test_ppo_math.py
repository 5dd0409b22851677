"""PPO's tensor math against hand-computed values (modules/rl/ppo.py)."""

import math

import pytest
import torch

from modules.rl import ppo


def test_per_token_rewards_put_the_score_on_the_last_token():
    scores = torch.tensor([2.0, -1.0])
    kl_penalty = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = ppo.per_token_rewards(scores, kl_penalty, mask)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, -0.2, 1.7], [-0.5, -1.5, 0.0]]))


def test_gae_hand_values():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.4, 0.3]])
    advantages, returns = ppo.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # t=2: 1 - 0.3 = 0.7; t=1: 0.9*0.3 - 0.4 + 0.72*0.7 = 0.374; t=0: 0.9*0.4 - 0.5 + 0.72*0.374
    assert advantages.tolist()[0] == pytest.approx([0.12928, 0.374, 0.7])
    assert returns.tolist()[0] == pytest.approx([0.62928, 0.774, 1.0])


def test_gae_ignores_everything_beyond_the_mask():
    rewards, values = torch.tensor([[0.0, 2.0, 9.0]]), torch.tensor([[1.0, 1.0, 7.0]])
    advantages, returns = ppo.gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[1.0, 1.0, 0.0]] and returns.tolist() == [[2.0, 2.0, 0.0]]


def test_masked_whiten_hand_values():
    x, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])
    assert ppo.masked_whiten(x, mask).tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)  # unbiased var 1
    assert ppo.masked_whiten(x, mask, shift_mean=False).tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)
    # statistics summed over two "ranks" give what one rank with all the data gets
    parts = [(x[:2], mask[:2]), (x[2:], mask[2:])]
    assert ppo.masked_whiten(x[:2], mask[:2], reduce=_ReduceOver(parts, 0)).tolist() == pytest.approx([-1.0, 0.0])


class _ReduceOver:
    """A stand-in for an all-reduce: recomputes each statistic on every part and sums them."""

    def __init__(self, parts, me):
        self.parts, self.me, self.calls = parts, me, 0

    def __call__(self, t):
        self.calls += 1
        totals = torch.zeros_like(t)
        for values, mask in self.parts:
            m = mask.float()
            if self.calls == 1:  # [count, sum]
                totals = totals + torch.stack([m.sum(), (values * m).sum()])
            else:  # sum of squared deviations from the (global) mean 2.0
                totals = totals + ((values - 2.0) ** 2 * m).sum()
        return totals


def test_clipped_policy_loss_hand_values():
    logp, old = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.6]))  # ratios 2, 0.5
    loss, clipfrac = ppo.clipped_policy_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2), 0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and clipfrac.item() == 1.0
    logp, old = torch.log(torch.tensor([0.5, 1.1])), torch.zeros(2)  # ratios 0.5, 1.1
    loss, clipfrac = ppo.clipped_policy_loss(logp, old, torch.tensor([1.0, 1.0]), torch.ones(2), 0.2)
    assert loss.item() == pytest.approx((-0.5 - 1.1) / 2) and clipfrac.item() == 0.0
    # masked tokens count for nothing
    loss, _ = ppo.clipped_policy_loss(logp, old, torch.tensor([1.0, 50.0]), torch.tensor([1, 0]), 0.2)
    assert loss.item() == pytest.approx(-0.5)


def test_clipped_policy_loss_gradient_vanishes_where_clipped():
    logp = torch.log(torch.tensor([0.5, 0.3])).requires_grad_(True)
    old = torch.log(torch.tensor([0.25, 0.3]))  # ratio 2 (clipped at 1.2 for A > 0), ratio 1
    loss, _ = ppo.clipped_policy_loss(logp, old, torch.tensor([1.0, 1.0]), torch.ones(2), 0.2)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, -0.5])  # d(-A r)/dlogp = -A r / 2 tokens


def test_clipped_value_loss_hand_values():
    loss, clipfrac = ppo.clipped_value_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]),
                                            torch.tensor([2.0, 0.0]), torch.ones(2), 0.2)
    # clipped values 0.7 and 0.3: max((1-2)^2, (0.7-2)^2) = 1.69, max(0, 0.09) = 0.09
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2) and clipfrac.item() == 1.0


def test_approx_kl_and_explained_variance():
    value = ppo.approx_kl_k3(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])), torch.ones(1))
    assert value.item() == pytest.approx(1.0 - math.log(2.0))
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    assert ppo.explained_variance(returns, returns, torch.ones(1, 3)).item() == pytest.approx(1.0)
    assert ppo.explained_variance(torch.zeros(1, 3), returns, torch.ones(1, 3)).item() == pytest.approx(0.0)
    assert math.isnan(float(ppo.explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3))))
