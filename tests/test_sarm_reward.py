"""SARMReward on rollouts: R_SARM, in-RM control, shaping by hand, the KL term, checkpointable state,
the human-latent buffer, and one-line errors for bad configuration."""

from __future__ import annotations

import json

import pytest
import torch

from modules.errors import UserError
from modules.rewards import WeightedSum
from modules.rollout import Rollout
from modules.sarm.human_latents import build_human_latents, load_human_latents, save_human_latents
from modules.sarm.model import SARMRewardModel
from modules.sarm.random_sarm import write_random_sarm
from modules.sarm.reward import SARMReward

PROMPTS = ["Is the Earth flat? I think so.", "2 + 2 = 5, right?", "My essay is perfect, yes?", "Cats are dogs. Right?"]
RESPONSES = ["No, it is round.", "Yes, absolutely, you are right!", "It has a few issues.", "Totally!"]


def make_rollout(prompts=PROMPTS, responses=RESPONSES) -> Rollout:
    b = len(prompts)
    return Rollout(list(prompts), torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.long),
                   torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.long), list(responses))


@pytest.fixture(scope="module")
def sarm_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return str(write_random_sarm(tmp_path_factory.mktemp("sarm_reward"), hidden_size=32, layers=2, latent_size=48,
                                 k=8, tokenizer=tokenizer, use_topk=False, seed=5))


@pytest.fixture(scope="module")
def plain(sarm_dir):
    return SARMRewardModel.load(sarm_dir, device="cpu").score(PROMPTS, RESPONSES)


@pytest.fixture()
def demos(tmp_path):
    path = tmp_path / "demos.jsonl"
    rows = [{"prompt": p, "response": r} for p, r in zip(PROMPTS * 3, ["No.", "That is not right.", "Fine.",
                                                                       "Let me check."] * 3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_plain_reward_is_the_sarm_score(sarm_dir, plain):
    reward = SARMReward(sarm_dir, device="cpu", batch_size=3)
    rewards = reward.score(make_rollout())
    assert torch.allclose(rewards.values, plain.rewards, atol=1e-5)
    assert rewards.valid.all() and set(rewards.parts) == {"sarm"}
    assert rewards.features["latents"].shape == (4, 48)


def test_feature_penalty_matches_hand_computation(sarm_dir, plain):
    z = plain.latents
    features = [0, 5, 9]
    taus = [float(z[:, 0].median()), float(z[:, 5].min()) - 1.0, float(z[:, 9].max()) + 1.0]  # mixed, always, never
    reward = SARMReward(sarm_dir, device="cpu", penalize_features=features, tau_values=taus, alpha_values=[0.5, 0.25, 4.0])
    rewards = reward.score(make_rollout())
    by_hand = 0.5 * (z[:, 0] > taus[0]).float() + 0.25
    assert torch.allclose(rewards.parts["feature_penalty"], by_hand)
    assert torch.allclose(rewards.values, plain.rewards - by_hand, atol=1e-5)
    assert rewards.parts["active/5"].tolist() == [1.0] * 4 and rewards.parts["active/9"].tolist() == [0.0] * 4


def test_in_rm_clamp_and_what_the_penalty_sees(sarm_dir, plain):
    reward = SARMReward(sarm_dir, device="cpu", clamp_features="3", clamp_values="0.0",
                        penalize_features=[3], tau_values=[-100.0], alpha_values=[1.0])
    rewards = reward.score(make_rollout())
    w3 = SARMRewardModel.load(sarm_dir, device="cpu").score_weight[3]
    expected_sarm = plain.rewards + w3 * (0.0 - plain.latents[:, 3])
    assert torch.allclose(rewards.parts["sarm"], expected_sarm, atol=1e-5)
    assert torch.allclose(rewards.parts["sarm_uncontrolled"], plain.rewards, atol=1e-5)
    assert torch.allclose(rewards.values, expected_sarm - 1.0, atol=1e-5)  # penalty reads the uncontrolled z
    assert reward.controlled_features() == {3: -100.0}


def test_bad_configuration_is_one_line(sarm_dir, tmp_path):
    with pytest.raises(UserError, match="tau_values has 2 entries but penalize_features has 3"):
        SARMReward(sarm_dir, penalize_features=[1, 2, 3], tau_values=[1.0, 2.0], alpha_values=[0.1])
    with pytest.raises(UserError, match="alpha_values has 2 entries"):
        SARMReward(sarm_dir, penalize_features="1,2,3", tau_values="1.0", alpha_values="0.1,0.2")
    with pytest.raises(UserError, match="kl_beta > 0 needs human_latents"):
        SARMReward(sarm_dir, kl_beta=0.1)
    with pytest.raises(UserError, match="does not exist"):
        SARMReward(sarm_dir, kl_beta=0.1, human_latents=str(tmp_path / "none.pt"))
    reward = SARMReward(sarm_dir, device="cpu", penalize_features=[3, 48], tau_values=[1.0], alpha_values=[0.1])
    with pytest.raises(UserError, match=r"penalize_features \[48\] are outside the SARM's 48 latents") as err:
        reward.preflight()
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="outside the SARM's 48 latents"):
        SARMReward(sarm_dir, device="cpu", clamp_features=[60], clamp_values=[0.0]).preflight()


def test_selected_features_file_fills_the_penalty(sarm_dir, tmp_path):
    path = tmp_path / "selected_features.json"
    path.write_text(json.dumps({"penalize_features": [4, 7], "tau_values": [1.5, 2.5], "alpha_values": [0.1, 0.2]}))
    reward = SARMReward(sarm_dir, selected_features=str(path))
    assert (reward.penalize_features, reward.tau_values, reward.alpha_values) == ([4, 7], [1.5, 2.5], [0.1, 0.2])
    assert SARMReward(sarm_dir, selected_features=str(path), alpha_values=[0.3]).alpha_values == [0.3, 0.3]


def test_human_latent_buffer(sarm_dir, demos, tmp_path):
    rm = SARMRewardModel.load(sarm_dir, device="cpu")
    payload = build_human_latents(rm, demos, [0, 3, 7], batch_size=5, source=sarm_dir, progress=False)
    path = save_human_latents(payload, tmp_path / "human.pt")
    buffer = load_human_latents(path)
    assert buffer.latents.shape == (12, 3) and buffer.latent_ids == [0, 3, 7] and buffer.latent_size == 48
    full = rm.score([json.loads(line)["prompt"] for line in open(demos)], [json.loads(line)["response"] for line in open(demos)])
    assert torch.allclose(buffer.columns([7, 0]), full.latents[:, [7, 0]].half().float())
    with pytest.raises(UserError, match="no column for latents \\[5\\]"):
        buffer.columns([5])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="demonstrations file .* is empty"):
        build_human_latents(rm, str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected a JSON object with string fields prompt, response"):
        build_human_latents(rm, str(bad))


def test_kl_term_metrics_and_exact_resume(sarm_dir, demos, tmp_path):
    rm = SARMRewardModel.load(sarm_dir, device="cpu")
    path = save_human_latents(build_human_latents(rm, demos, list(range(16)), progress=False), tmp_path / "human.pt")
    options = dict(device="cpu", kl_beta=0.5, human_latents=str(path), kl_features=[0, 1, 2, 3, 4, 5],
                   disc_hidden=16, disc_batch_size=4, disc_steps=2)
    reward = SARMReward(sarm_dir, **options)
    first = reward.score(make_rollout())
    assert torch.allclose(first.parts["kl_penalty"], 0.5 * first.parts["kl_logit"])
    assert torch.allclose(first.values, first.parts["sarm"] - first.parts["kl_penalty"], atol=1e-6)
    metrics = reward.metrics()
    assert set(metrics) == {"sarm/kl_estimate", "sarm/disc_loss", "sarm/disc_accuracy"}
    assert reward.metrics() == {}  # reset after reading
    state = reward.state_dict()

    resumed = SARMReward(sarm_dir, **options)
    resumed.load_state_dict(state)  # before the discriminator exists: applied when it is built
    for _ in range(2):
        a, b = reward.score(make_rollout()), resumed.score(make_rollout())
        assert torch.equal(a.values, b.values) and torch.equal(a.parts["kl_logit"], b.parts["kl_logit"])
    with reward.frozen_discriminator():
        steps = reward.discriminator.steps
        reward.score(make_rollout())
        assert reward.discriminator.steps == steps
    with pytest.raises(UserError, match="no column for latents"):
        SARMReward(sarm_dir, **{**options, "kl_features": [20]}).preflight()


def test_weighted_sum_keeps_the_latents(sarm_dir, plain):
    total = WeightedSum([SARMReward(sarm_dir, device="cpu"), SARMReward(sarm_dir, device="cpu", name="again")],
                        weights=[1.0, 0.5])
    rewards = total.score(make_rollout())
    assert torch.allclose(rewards.values, 1.5 * plain.rewards, atol=1e-5)
    assert rewards.features["sarm/latents"].shape == (4, 48)
