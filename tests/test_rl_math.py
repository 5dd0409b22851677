"""Losses, KL estimators and advantages against hand-computed values and exact expectations."""

import math

import pytest
import torch

from callbacks.checkpoints import evenly_spaced_steps
from modules.on_policy import PromptBatch
from modules.rl.advantages import ema_update, masked_mean, masked_std, raw_advantages, zscore_advantages
from modules.errors import UserError
from modules.rl.kl import exact_kl, k3_kl, kl_term, sampled_log_ratio
from modules.rl.losses import per_sequence_sum, reinforce_loss, response_token_stats
from modules.rollout import response_mask_from_ids


def test_exact_kl_hand_value():
    # p = (0.25, 0.75), q = (0.5, 0.5): KL = 0.25 ln 0.5 + 0.75 ln 1.5
    p_logits = torch.tensor([[0.0, math.log(3.0)]])
    q_logits = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert exact_kl(p_logits, q_logits).item() == pytest.approx(expected, abs=1e-6)
    assert exact_kl(q_logits, q_logits).item() == pytest.approx(0.0, abs=1e-7)


def test_k3_and_log_ratio_hand_values():
    logp, ref = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])
    assert k3_kl(logp, ref).item() == pytest.approx(2.0 - 1.0 - math.log(2.0), abs=1e-6)  # r = 2
    assert sampled_log_ratio(logp, ref).item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_kl_terms_by_hand():
    logp, ref, full = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)]), torch.tensor([0.7])
    exact, k3, reward = kl_term("exact"), kl_term("k3"), kl_term("reward")
    assert exact.token_loss(logp, ref, full).item() == pytest.approx(0.7)  # the full-vocabulary KL as given
    assert exact.full_kl is exact_kl and exact.compares_logits and not exact.in_reward
    assert k3.token_loss(logp, ref, None).item() == pytest.approx(2.0 - 1.0 - math.log(2.0), abs=1e-6)
    assert not k3.compares_logits and not k3.in_reward
    assert reward.token_loss(logp, ref, None).tolist() == [0.0] and reward.in_reward and not reward.compares_logits
    with pytest.raises(UserError, match="unknown kl_estimator 'k2'"):
        kl_term("k2")


def test_reinforce_loss_hand_value_and_mask():
    seq_logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 5.0])
    valid = torch.tensor([True, True, False])
    loss = reinforce_loss(seq_logp, advantages, valid)
    assert loss.item() == pytest.approx(-((1 * -1) + (-1 * -2)) / 2)
    loss.backward()
    assert seq_logp.grad.tolist() == pytest.approx([-0.5, 0.5, 0.0])  # the failed sample gets no gradient


def test_advantages_hand_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 100.0])
    valid = torch.tensor([True, True, True, False])
    assert masked_mean(rewards, valid).item() == pytest.approx(2.0)
    assert masked_std(rewards, valid).item() == pytest.approx(1.0)
    assert zscore_advantages(rewards, valid).tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-5)
    assert raw_advantages(rewards, valid).tolist() == [1.0, 2.0, 3.0, 0.0]
    assert zscore_advantages(torch.tensor([5.0]), torch.tensor([True])).tolist() == [0.0]
    assert ema_update(None, 3.0, 0.9) == 3.0
    assert ema_update(3.0, 1.0, 0.9) == pytest.approx(2.8)


def _expected_grad(loss_of_outcome, theta):
    """E_{y ~ softmax(theta)}[grad loss(y)] by enumerating y (the sampling itself not differentiated)."""
    probs = torch.softmax(theta.detach(), -1)
    total = torch.zeros_like(theta)
    for y in range(theta.numel()):
        (grad,) = torch.autograd.grad(loss_of_outcome(y), theta)
        total += probs[y] * grad
    return total


def test_kl_estimators_have_the_right_expected_gradient():
    theta = torch.tensor([0.3, -1.2, 0.8], requires_grad=True)
    ref_logits = torch.tensor([0.0, 0.5, -0.4])
    logq = torch.log_softmax(ref_logits, -1)

    def logp(y):
        return torch.log_softmax(theta, -1)[y]

    (grad_forward_kl,) = torch.autograd.grad(exact_kl(theta, ref_logits), theta)
    p_fixed = torch.softmax(ref_logits, -1)
    reverse_kl = (p_fixed * (logq - torch.log_softmax(theta, -1))).sum()
    (grad_reverse_kl,) = torch.autograd.grad(reverse_kl, theta)

    # the sampled log-ratio used directly as a loss: zero expected gradient (why it is not offered)
    naive = _expected_grad(lambda y: sampled_log_ratio(logp(y), logq[y]), theta)
    torch.testing.assert_close(naive, torch.zeros(3), atol=1e-6, rtol=0)
    # k3 as a loss: the gradient of KL(ref || p)
    k3 = _expected_grad(lambda y: k3_kl(logp(y), logq[y]), theta)
    torch.testing.assert_close(k3, grad_reverse_kl, atol=1e-6, rtol=0)
    # the log-ratio folded into the reward of a REINFORCE loss: the gradient of KL(p || ref)
    folded = _expected_grad(lambda y: (logp(y) - logq[y]).detach() * logp(y), theta)
    torch.testing.assert_close(folded, grad_forward_kl, atol=1e-6, rtol=0)
    assert grad_forward_kl.abs().sum() > 0.1  # the comparison is not between zeros


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_token_stats_match_one_pass(chunk):
    torch.manual_seed(0)
    n, d, vocab = 7, 5, 11
    hidden = torch.randn(n, d, requires_grad=True)
    ref_hidden = torch.randn(n, d)
    weight = torch.randn(vocab, d)
    targets = torch.randint(0, vocab, (n,))
    stats = response_token_stats(hidden, ref_hidden, targets, weight, 0.7, exact_kl, chunk, entropy=True)
    logp, ref_logp, kl = stats.logp, stats.ref_logp, stats.kl
    (logp.sum() + kl.sum() + stats.entropy.sum()).backward()
    grad = hidden.grad.clone()

    hidden2 = hidden.detach().clone().requires_grad_(True)
    logits, ref_logits = hidden2 @ weight.T / 0.7, ref_hidden @ weight.T / 0.7
    logp2 = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    ref_logp2 = torch.log_softmax(ref_logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    kl2 = exact_kl(logits, ref_logits)
    entropy2 = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    (logp2.sum() + kl2.sum() + entropy2.sum()).backward()
    torch.testing.assert_close(logp, logp2)
    torch.testing.assert_close(stats.entropy, entropy2)
    torch.testing.assert_close(ref_logp, ref_logp2)
    torch.testing.assert_close(kl, kl2)
    torch.testing.assert_close(grad, hidden2.grad)


def test_token_stats_without_reference():
    hidden, weight = torch.randn(4, 3), torch.randn(6, 3)
    stats = response_token_stats(hidden, None, torch.tensor([0, 1, 2, 3]), weight)
    assert stats.logp.shape == (4,) and stats.ref_logp is None and stats.kl is None and stats.entropy is None


def test_sequence_and_mask_helpers():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert per_sequence_sum(torch.tensor([1.0, 2.0, 3.0]), mask).tolist() == [3.0, 3.0]
    ids = torch.tensor([[5, 2, 7, 2], [1, 1, 1, 1]])
    assert response_mask_from_ids(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_evenly_spaced_steps():
    assert evenly_spaced_steps(30, 10) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert evenly_spaced_steps(25, 10) == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]
    assert evenly_spaced_steps(7, 10) == [1, 2, 3, 4, 5, 6, 7]
    assert evenly_spaced_steps(0, 10) == []


def test_prompt_batch_split_drops_padding_columns():
    ids = torch.tensor([[0, 0, 0, 5], [0, 0, 6, 7], [0, 8, 9, 9]])
    mask = (ids != 0).long()
    parts = PromptBatch(4, ["a", "b", "c"], ids, mask).split(2)
    assert [p.prompts for p in parts] == [["a", "b"], ["c"]]
    assert parts[0].input_ids.tolist() == [[0, 5], [6, 7]]
    assert parts[1].input_ids.tolist() == [[8, 9, 9]]
    assert all(p.index == 4 for p in parts)


def test_ppo_departures_from_trl_are_as_documented():
    """modules/rl/ppo.py departures 1 and 4: the score on the end-of-turn token, which is in the mask
    (TRL, with pad == EOS, leaves it out of the loss); 0 where TRL's statistics give NaN."""
    from modules.rl import ppo

    mask = response_mask_from_ids(torch.tensor([[7, 8, 2, 2]]), stop_ids=[2])  # EOS (= pad) at index 2
    assert mask.tolist() == [[1, 1, 1, 0]]
    rewards = ppo.per_token_rewards(torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 0.3, 0.0]]), mask)
    assert rewards.tolist()[0] == pytest.approx([-0.1, -0.2, 0.7, 0.0])  # TRL: [-0.1, -0.2, 1.0, 0]
    one = torch.tensor([[0.0, 1.0]])
    assert ppo.masked_whiten(torch.tensor([[5.0, 3.0]]), one).tolist() == [[0.0, 0.0]]  # TRL: NaN
    assert ppo.masked_token_mean(torch.tensor([[5.0, 3.0]]), torch.zeros(1, 2)).item() == 0.0  # TRL: NaN
