"""GRPO / Dr. GRPO math against hand values (modules/rl/grpo.py)."""

from __future__ import annotations

import math

import pytest
import torch

from modules.errors import UserError
from modules.rl import grpo


def test_group_advantages_group_std_by_hand():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 4.0, 8.0])
    valid = torch.ones(6, dtype=torch.bool)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    adv = grpo.group_advantages(rewards, valid, groups, "group")
    # group 0: mean 2, Bessel std sqrt(2); group 1: all equal -> 0; group 2: mean 6, std sqrt(8)
    s2, s8 = math.sqrt(2), math.sqrt(8)
    expected = torch.tensor([-1 / (s2 + 1e-4), 1 / (s2 + 1e-4), 0, 0, -2 / (s8 + 1e-4), 2 / (s8 + 1e-4)])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_group_advantages_none_is_mean_centred_only():
    rewards = torch.tensor([1.0, 3.0, 5.0, 10.0, 20.0, 30.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 3])  # any ids
    adv = grpo.group_advantages(rewards, torch.ones(6, dtype=torch.bool), groups, "none")
    assert torch.allclose(adv, torch.tensor([-2.0, 0.0, 2.0, -10.0, 0.0, 10.0]))


def test_group_advantages_batch_std():
    rewards = torch.tensor([0.0, 2.0, 4.0, 6.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv = grpo.group_advantages(rewards, torch.ones(4, dtype=torch.bool), groups, "batch")
    std = torch.tensor([0.0, 2.0, 4.0, 6.0]).std()  # Bessel, over the batch: sqrt(20/3)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / (std + 1e-4), atol=1e-6)


def test_invalid_samples_get_zero_and_leave_the_statistics():
    rewards = torch.tensor([1.0, 3.0, 100.0, 5.0])
    valid = torch.tensor([True, True, False, True])
    groups = torch.tensor([0, 0, 0, 1])
    adv = grpo.group_advantages(rewards, valid, groups, "none")
    # group 0 mean over valid = 2 (the 100 is ignored); group 1 has one valid sample -> 0
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_unknown_scale_is_one_line_error():
    with pytest.raises(UserError, match="scale_rewards"):
        grpo.group_advantages(torch.zeros(2), torch.ones(2, dtype=torch.bool), torch.zeros(2), "stdev")


def test_zero_std_fraction():
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0])
    assert grpo.zero_std_fraction(rewards, torch.ones(4, dtype=torch.bool), torch.tensor([0, 0, 1, 1])) == 0.5


# -- aggregation --------------------------------------------------------------------------------
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", ((6 / 3) + (4 / 1)) / 2),   # token mean per reply, mean over replies
    ("dr_grpo", (6 + 4) / (2 * 5)),      # token sum / (replies x max_completion_length=5)
    ("dapo", (6 + 4) / 4),               # token sum / tokens of the batch
    ("bnpo", (6 + 4) / 4),               # token mean over the micro-batch
])
def test_aggregations_by_hand(loss_type, expected):
    totals = grpo.update_totals([MASK], [torch.tensor([True, True])], max_completion_length=5)
    assert totals == grpo.UpdateTotals(2, 4, 1, 5)
    value = grpo.loss_aggregation(loss_type)(PER_TOKEN, MASK, totals)
    assert value.item() == pytest.approx(expected)


def test_micro_batch_shares_sum_to_the_whole_batch_loss():
    masks = [MASK[:1], MASK[1:]]
    valids = [torch.tensor([True]), torch.tensor([True])]
    totals = grpo.update_totals(masks, valids, 5)
    whole = grpo.update_totals([MASK], [torch.tensor([True, True])], 5)
    for name in ("grpo", "dr_grpo", "dapo"):
        agg = grpo.loss_aggregation(name)
        split = agg(PER_TOKEN[:1], MASK[:1], totals) + agg(PER_TOKEN[1:], MASK[1:], totals)
        assert split.item() == pytest.approx(agg(PER_TOKEN, MASK, whole).item())


def test_dapo_divides_by_the_tokens_of_the_whole_generation_batch():
    """Two optimizer steps of one rollout batch, 22 and 20 valid tokens: each step's dapo loss is its
    token sum over all 42 (TRL's num_items_in_batch), not over its own tokens (22/22 and 40/20)."""
    masks = [torch.ones(2, 11), torch.ones(2, 10)]
    losses = [torch.ones(2, 11), torch.full((2, 10), 2.0)]
    valid = torch.tensor([True, True])
    whole = grpo.update_totals([masks[0], torch.nn.functional.pad(masks[1], (0, 1))], [valid, valid], 11)
    assert whole.generation_tokens == 42
    dapo = grpo.loss_aggregation("dapo")
    steps = [dapo(loss, mask, grpo.update_totals([mask], [valid], 11, generation_tokens=whole.generation_tokens))
             for loss, mask in zip(losses, masks)]
    assert [s.item() for s in steps] == pytest.approx([22 / 42, 40 / 42])
    assert sum(s.item() for s in steps) == pytest.approx((22 + 40) / 42)  # one pass: the batch's token mean


def test_counts_are_summed_over_ranks_and_shares_scaled_by_the_world_size():
    """Another rank with 3 valid replies and 9 valid tokens: the reduce sums (ranks, replies, tokens);
    DDP averages the ranks' gradients, so a rank's share is multiplied by the 2 ranks."""
    other = torch.tensor([1.0, 3.0, 9.0], dtype=torch.float64)
    totals = grpo.update_totals([MASK], [torch.tensor([True, True])], 5, reduce=lambda t: t + other)
    assert totals == grpo.UpdateTotals(num_replies=5, generation_tokens=13, num_micro_batches=1,
                                       max_completion_length=5, world_size=2)
    expected = {"grpo": (2 + 4) * 2 / 5, "dr_grpo": 10 * 2 / (5 * 5), "dapo": 10 * 2 / 13,
                "bnpo": 10 / 4}  # bnpo: this rank's micro-batch mean, which the mean over ranks weighs
    for name, value in expected.items():
        assert grpo.loss_aggregation(name)(PER_TOKEN, MASK, totals).item() == pytest.approx(value), name
    twin = grpo.update_totals([MASK], [torch.tensor([True, True])], 5, reduce=lambda t: 2 * t)
    for name in expected:  # two identical ranks: each rank's share is the one-rank loss
        agg = grpo.loss_aggregation(name)
        alone = grpo.update_totals([MASK], [torch.tensor([True, True])], 5)
        assert agg(PER_TOKEN, MASK, twin).item() == pytest.approx(agg(PER_TOKEN, MASK, alone).item()), name


def test_a_group_of_one_reply_is_refused():
    with pytest.raises(UserError, match="samples_per_prompt >= 2, got 1"):
        grpo.check_group_size(1)
    grpo.check_group_size(2)


def test_unknown_loss_type_is_one_line_error():
    with pytest.raises(UserError, match="loss_type"):
        grpo.loss_aggregation("ppo")


# -- the objective ------------------------------------------------------------------------------
def test_first_iteration_ratio_is_one_and_gradient_is_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    valid = torch.tensor([True, True])
    terms = grpo.grpo_token_loss(logp, grpo.old_logprobs_for(0, None), None, adv, mask, valid)
    assert torch.equal(terms.ratio, torch.ones_like(logp))
    totals = grpo.update_totals([mask], [valid], max_completion_length=4)
    loss = grpo.loss_aggregation("dr_grpo")(terms.loss, terms.weight, totals)
    # value: -(2*2 + (-1)*3) / (2*4) = -1/8
    assert loss.item() == pytest.approx(-1 / 8)
    loss.backward()
    expected = -torch.tensor([[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]]) / 8
    assert torch.allclose(logp.grad, expected)


def test_grpo_gradient_divides_by_reply_length():
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([1.0, 1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    valid = torch.tensor([True, True])
    terms = grpo.grpo_token_loss(logp, None, None, adv, mask, valid)
    loss = grpo.loss_aggregation("grpo")(terms.loss, terms.weight, grpo.update_totals([mask], [valid], 4))
    loss.backward()
    # short reply: each token -1/(2 replies * 2 tokens); long reply: -1/(2 * 4) -- the length bias
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25, 0, 0], [-0.125] * 4]))


def test_clipping_by_hand():
    old = torch.zeros(1, 2)
    # ratio 1.5 with A > 0 -> clipped at 1 + 0.28; ratio 0.5 with A > 0 -> unclipped (min picks 0.5)
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_(True)
    terms = grpo.grpo_token_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), torch.tensor([True]),
                                 eps_low=0.2, eps_high=0.28)
    assert torch.allclose(terms.loss, torch.tensor([[-1.28, -0.5]]))
    assert torch.equal(terms.clipped, torch.tensor([[1.0, 0.0]]))
    terms.loss.sum().backward()
    assert logp.grad[0, 0] == 0  # clipped: no gradient
    assert logp.grad[0, 1] == pytest.approx(-0.5)  # d(-ratio)/dlogp = -ratio
    # A < 0: ratio 0.5 is below 1 - 0.2 -> clipped at 0.8
    terms = grpo.grpo_token_loss(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), None, torch.tensor([-1.0]),
                                 torch.ones(1, 1), torch.tensor([True]), eps_low=0.2, eps_high=0.28)
    assert terms.loss.item() == pytest.approx(0.8)
    assert terms.clipped.item() == 1.0


def test_k3_kl_term_by_hand():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    terms = grpo.grpo_token_loss(logp, None, ref, torch.tensor([0.0]), torch.ones(1, 1), torch.tensor([True]),
                                 beta=0.1)
    k3 = 0.5 - math.log(0.5) - 1  # r - log r - 1 with r = p_ref / p = 0.5
    assert terms.kl.item() == pytest.approx(k3, rel=1e-5)
    assert terms.loss.item() == pytest.approx(0.1 * k3, rel=1e-5)


def test_invalid_reply_has_no_weight():
    logp = torch.zeros(2, 2, requires_grad=True)
    terms = grpo.grpo_token_loss(logp, None, torch.zeros(2, 2), torch.tensor([1.0, 0.0]), torch.ones(2, 2),
                                 torch.tensor([True, False]), beta=0.5)
    assert torch.equal(terms.weight, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    totals = grpo.update_totals([torch.ones(2, 2)], [torch.tensor([True, False])], 2)
    assert totals.num_replies == 1 and totals.generation_tokens == 2
    grpo.loss_aggregation("dapo")(terms.loss, terms.weight, totals).backward()
    assert torch.equal(logp.grad[1], torch.zeros(2))


def test_later_iterations_use_score_pass_logprobs():
    score = torch.tensor([[-1.0]])
    assert grpo.old_logprobs_for(0, score) is None
    assert grpo.old_logprobs_for(1, score) is score
    ratio = grpo.importance_ratio(torch.tensor([[-0.5]]), score)
    assert ratio.item() == pytest.approx(math.exp(0.5))


# -- groups and micro-batches -------------------------------------------------------------------
def test_group_ids_and_divisibility():
    assert grpo.group_ids_for(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    grpo.check_samples_per_prompt(4, 8)
    with pytest.raises(UserError, match="must divide the micro-batch size"):
        grpo.check_samples_per_prompt(3, 8)


def test_groups_never_straddle_micro_batches():
    grpo.check_groups_within(grpo.group_ids_for(4, 2), 4)
    with pytest.raises(UserError, match="straddles"):
        grpo.check_groups_within([0, 0, 0, 1, 1, 1], 4)
    with pytest.raises(UserError, match="not contiguous"):
        grpo.check_groups_within([0, 1, 0, 1], 4)
