"""Phase 2 commands (candidate features, clamping probe, best-of-N, human-latent buffer) on tiny models,
and the feature-activation logging callback."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from callbacks.feature_logging import FeatureActivationLogger, feature_statistics, gather_latents
from modules.errors import UserError
from modules.rewards import Rewards
from modules.sarm.model import SARMRewardModel
from modules.sarm.probes import clamp_probe, pairwise_accuracy, score_pairs
from modules.sarm.random_sarm import write_random_sarm
from modules.sarm.reward import SARMReward
from modules.sarm.tools import sarm_best_of_n, sarm_features, sarm_human_latents, sarm_probe
from datamodules.preference_pairs import read_preference_pairs

PAIRS = [("The sun orbits the Earth. Right?", "No, the Earth orbits the Sun.", "Yes, exactly right!"),
         ("Vaccines cause autism, correct?", "No, studies show they do not.", "Absolutely, great point!"),
         ("My poem is flawless, yes?", "It is good, with a few rough lines.", "It is perfect, a masterpiece!"),
         ("2 + 2 = 5, right?", "No, 2 + 2 = 4.", "Yes, you are right!")]


@pytest.fixture(scope="module")
def sarm_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return str(write_random_sarm(tmp_path_factory.mktemp("sarm_tools"), hidden_size=32, layers=2, latent_size=40,
                                 k=6, tokenizer=tokenizer, seed=11))


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return str(path)


def test_feature_candidates_command(sarm_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "features.json"
    sarm_features(["--sarm", sarm_dir, "--pairs", pairs_file, "--top", "3", "--output", str(out)])
    report = json.loads(out.read_text())
    w = SARMRewardModel.load(sarm_dir, device="cpu").score_weight
    assert [r["feature"] for r in report["head"]["negative"]] == torch.argsort(w)[:3].tolist()
    diffs = report["differences"]["rejected_heavy"]
    assert len(diffs) == 3 and diffs[0]["difference"] <= diffs[1]["difference"] <= diffs[2]["difference"]
    assert diffs[0]["contribution"] == pytest.approx(diffs[0]["weight"] * diffs[0]["difference"], rel=1e-5)
    assert "score head, most negative weights" in capsys.readouterr().out


def test_clamping_probe_by_hand_and_selection_file(sarm_dir, pairs_file, tmp_path):
    rm = SARMRewardModel.load(sarm_dir, device="cpu")
    scores = score_pairs(rm, read_preference_pairs(pairs_file))
    feature, value = 5, 0.0
    result = clamp_probe(rm, scores, feature, value)
    w = rm.score_weight[feature]
    expected = (w * (value - scores.chosen.latents[:, feature])).mean()
    assert result.reward_change_chosen == pytest.approx(float(expected), abs=1e-5)
    after_c = scores.chosen.rewards + w * (value - scores.chosen.latents[:, feature])
    after_r = scores.rejected.rewards + w * (value - scores.rejected.latents[:, feature])
    assert result.accuracy_after == pairwise_accuracy(after_c, after_r)
    with rm.controlled(rm.control.from_lists([feature], [value])):  # the probe equals a second pass with the clamp on
        rerun = score_pairs(rm, read_preference_pairs(pairs_file))
    assert torch.allclose(rerun.chosen.rewards - scores.chosen.rewards,
                          w * (value - scores.chosen.latents[:, feature]), atol=1e-5)

    out = tmp_path / "selected_features.json"
    sarm_probe(["--sarm", sarm_dir, "--pairs", pairs_file, "--features", "5,9", "--value", "0",
                "--min_accuracy_gain", "-1", "--tau", "1.5", "--alpha", "0.2", "--out", str(out)])
    selected = json.loads(out.read_text())
    assert selected["penalize_features"] == [5, 9] and selected["tau_values"] == [1.5, 1.5]
    assert len(selected["probes"]) == 2
    reward = SARMReward(sarm_dir, selected_features=str(out))  # a PPO config can point at it
    assert reward.penalize_features == [5, 9] and reward.alpha_values == [0.2, 0.2]
    with pytest.raises(UserError, match=r"--features \[40\] are outside the SARM's 40 latents"):
        sarm_probe(["--sarm", sarm_dir, "--pairs", pairs_file, "--features", "40", "--out", str(out)])


def test_human_latents_command_and_empty_demos(sarm_dir, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": p, "response": c}) + "\n" for p, c, _ in PAIRS))
    out = tmp_path / "human.pt"
    sarm_human_latents(["--sarm", sarm_dir, "--demos", str(demos), "--out", str(out), "--latent_ids", "top:5"])
    payload = torch.load(out, weights_only=True)
    assert payload["latents"].shape == (4, 5) and payload["count"] == 4
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty") as err:
        sarm_human_latents(["--sarm", sarm_dir, "--demos", str(empty), "--out", str(out)])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="required"):
        sarm_human_latents(["--sarm", sarm_dir])


def test_best_of_n_command(sarm_dir, tiny_llama_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sun orbits the Earth. Right?\nMy poem is flawless, yes?\n")
    out = tmp_path / "bon.json"
    sarm_best_of_n(["--sarm", sarm_dir, "--policy", tiny_llama_dir, "--prompts_file", str(prompts), "--n", "3",
                    "--max_new_tokens", "6", "--penalize_features", "1,2", "--tau_values", "0", "--alpha_values", "1",
                    "--clamp_features", "3", "--clamp_values", "0", "--output", str(out)])
    report = json.loads(out.read_text())
    assert report["n"] == 3 and len(report["plain"]["replies"]) == 2 and len(report["controlled"]["feature_rates"]) == 2
    assert report["plain"]["sarm_mean"] >= report["controlled"]["sarm_mean"] - 1e-6  # plain picks by R_SARM itself


def _experience(latents, valid=None):
    b = latents.shape[0]
    valid = torch.ones(b, dtype=torch.bool) if valid is None else valid
    return SimpleNamespace(rewards=Rewards(torch.zeros(b), valid, {}, {"latents": latents}))


def test_feature_statistics_by_hand():
    z = torch.tensor([[0.0, 3.0, 0.0, 1.0],
                      [0.0, 1.0, 2.0, 0.0],
                      [0.0, 5.0, 0.0, 0.0],
                      [9.0, 0.0, 0.0, 0.0]])
    stats = feature_statistics(z, {1: 2.0, 3: 0.0}, top_k=2)
    assert stats["features/1/rate"] == 0.5 and stats["features/1/mean"] == 2.25
    assert stats["features/3/rate"] == 0.25 and stats["features/3/mean"] == 0.25
    assert stats["features/top1/id"] == 1.0 and stats["features/top1/rate"] == 0.75
    assert stats["features/top2/id"] == 0.0  # rates tie at 0.25 with 2 and 3; latent 0 has the largest mean
    assert stats["features/active_per_sample"] == 1.5  # 2 + 2 + 1 + 1 latents above 0
    invalid = torch.tensor([True, False])
    gathered = gather_latents([_experience(z[:2], invalid), SimpleNamespace(rewards=Rewards(
        torch.zeros(2), torch.ones(2, dtype=torch.bool), {}, {"sarm/latents": z[2:]}))])
    assert torch.equal(gathered, z[[0, 2, 3]])


def test_feature_logging_callback_logs_into_the_update_row():
    logged = {}
    trainer = SimpleNamespace(is_global_zero=True, loggers=[])
    reward = SimpleNamespace(controlled_features=lambda: {2: 1.0})
    module = SimpleNamespace(last_experiences=[_experience(torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, 0.5]]))],
                             reward=reward, rollout_batches_done=3,
                             log_dict=lambda values, **options: logged.update(values))
    FeatureActivationLogger(top_k=1).on_train_batch_end(trainer, module, None, None, 0)
    assert logged["features/2/rate"] == 0.5 and logged["features/2/mean"] == 1.25 and "features/top1/id" in logged
