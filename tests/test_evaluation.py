"""Held-out comparisons on a tiny model: every arm is paired, the evaluation judge is another judge,
``cli.py evaluate`` writes its table, JSON and frontier plot."""

import json
import logging

import pytest
import torch

from modules.evaluation import (EVAL_HONEST_PERSONA, EVAL_SYCOPHANT_PERSONA, Intervention, compare_interventions,
                                degeneration, evaluate_intervention)
from modules.judges.local import LocalJudge
from modules.judges.rewards import CANDID_PERSONA, FLATTERING_PERSONA, HONEST_PERSONA, SYCOPHANT_PERSONA
from modules.models.steering import SteeringVector
from modules.models.steering_io import save_steering_vector
from tests.helpers import PROMPTS, LengthJudge, PromptRecordingJudge, tiny_module
from tests.test_cli_and_checkpoints import cli


def _random_vector(module, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(module.policy.config.hidden_size, generator=torch.Generator().manual_seed(seed)) * scale


def test_every_arm_answers_the_same_prompts_with_the_same_seeds(tiny_llama_dir):
    module = tiny_module(tiny_llama_dir, judge=LengthJudge(fail_every=37), max_new_tokens=6)
    v = _random_vector(module, 0)
    arms = [Intervention("off", module.reference, reference=True),
            Intervention("off again", module.reference),          # the same policy: must give the same replies
            Intervention("steered", lambda: module.using_vector(v, 1.0), "steered", 1.0),
            Intervention("steered ×0", lambda: module.using_vector(v, 0.0), "steered", 0.0)]
    comparison, results = compare_interventions(module, PROMPTS, arms, samples_per_prompt=2, seed=5, batch_size=3,
                                                show_examples=2, progress=False)
    keys = [results[a.name].keys for a in arms]
    assert all(k == keys[0] for k in keys) and len({tuple(k) for k in keys[0]}) == len(keys[0])
    assert {k[0] for k in keys[0]} <= set(range(len(PROMPTS)))
    # judge failures (every 37th request) drop a sample from every arm, never from one only
    assert 0 < comparison.judge_failed < 8 and comparison.samples_per_arm == 2 * len(PROMPTS) - comparison.judge_failed
    assert [list(k) for k in keys[0]] == comparison.pairing
    # same seeds: the same policy answers identically, so its paired difference is exactly 0
    assert results["off"].replies == results["off again"].replies == results["steered ×0"].replies
    again = comparison.arm("off again")["rewards"]["training"]
    assert again["difference"] == 0.0 and again["paired_se"] == 0.0
    # the reference's KL is 0 by definition; a zero vector's exact KL is 0, a real one's is not
    assert comparison.arm("steered ×0")["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert comparison.arm("steered")["kl_per_token"] > 1e-3
    assert results["steered"].replies != results["off"].replies
    steered = comparison.arm("steered")["rewards"]["training"]
    diffs = [a - b for a, b in zip(results["steered"].rewards, results["off"].rewards)]
    assert steered["difference"] == pytest.approx(sum(diffs) / len(diffs))
    assert steered["paired_se"] == pytest.approx(torch.tensor(diffs).std().item() / len(diffs) ** 0.5)
    assert set(comparison.examples[0]["replies"]) == {a.name for a in arms}
    assert "steered ×0" in comparison.format()
    assert not any(p.requires_grad for p in module.policy.parameters()) and module.steering.enabled


def test_an_instructed_arm_reads_its_system_prompt_and_is_judged_and_measured_on_the_plain_prompt(tiny_llama_dir):
    judge = PromptRecordingJudge()
    module = tiny_module(tiny_llama_dir, judge=judge, max_new_tokens=6)
    arms = [Intervention("off", module.reference, reference=True),
            Intervention("told the same", module.reference, system_prompt="Answer briefly."),
            Intervention("told", module.reference, "told", system_prompt="You are a pirate. Answer like one."),
            Intervention("steered", lambda: module.using_vector(_random_vector(module, 0), 1.0))]
    comparison, results = compare_interventions(module, PROMPTS, arms, samples_per_prompt=2, seed=3, batch_size=3,
                                                system_prompt="Answer briefly.", progress=False)
    keys = [results[a.name].keys for a in arms]
    assert all(k == keys[0] for k in keys) and len(keys[0]) == 2 * len(PROMPTS)  # same prompts and seeds
    # an instruction equal to the comparison's own system prompt is the reference itself: same replies, KL 0
    assert results["told the same"].replies == results["off"].replies
    assert comparison.arm("told the same")["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    # another instruction changes the replies, and its KL is taken from the model reading the plain prompt
    assert results["told"].replies != results["off"].replies
    assert comparison.arm("told")["kl_per_token"] > 1e-3
    # the judge reads the user's prompt only, never the instruction
    assert set(judge.prompts) == set(PROMPTS)


def test_using_vector_leaves_the_own_vector_and_the_judge_unsteered(tiny_llama_dir):
    module = tiny_module(tiny_llama_dir, judge=LocalJudge(), reward_mode="loglik", max_new_tokens=4)
    own = module.steering
    v = _random_vector(module, 1)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        own_on = module.policy(input_ids=ids).logits  # its own (small random) vector
        with module.reference():
            base = module.policy(input_ids=ids).logits
        with module.using_vector(v, 2.0):
            steered = module.policy(input_ids=ids).logits
            with module.reference():
                reference = module.policy(input_ids=ids).logits
            with module.interventions_off():  # what a judge sharing the weights sees
                judged = module.policy(input_ids=ids).logits
        after = module.policy(input_ids=ids).logits
    assert not torch.allclose(steered, base)
    torch.testing.assert_close(reference, base, rtol=0, atol=0)
    torch.testing.assert_close(judged, base, rtol=0, atol=0)
    torch.testing.assert_close(after, own_on, rtol=0, atol=0)  # its own vector is back
    assert not torch.allclose(own_on, base)
    assert module.steering is own and own.enabled


def test_heldout_report_keeps_its_fields_and_adds_the_evaluation_judge(tiny_llama_dir):
    module = tiny_module(tiny_llama_dir, judge=LocalJudge(), reward_mode="contrast", reward_length_normalize=True,
                         max_new_tokens=5, init_std=3.0)
    report = evaluate_intervention(module, PROMPTS, samples_per_prompt=1, seed=3, batch_size=4, progress=False)
    assert report.samples_per_arm == len(PROMPTS) and report.arm_names == ("vector off", "vector on")
    assert report.kl_per_token > 0 and report.examples and {"off", "on", "reward_off", "reward_on"} <= set(report.examples[0])
    ev = report.evaluation_judge
    assert ev and "people-pleasing" in ev["description"]
    # another judge: the same replies score differently under other persona wording
    assert (ev["reward_on"], ev["reward_off"]) != (report.reward_on, report.reward_off)
    assert set(report.degeneration) == {"off", "on"} and len(report.comparison["arms"]) == 2
    assert "evaluation judge" in report.format() and "distinct-2" in report.format()
    data = report.as_dict()
    assert data["verdict"] and data["comparison"]["pairing"]


def test_evaluation_personas_differ_from_training_unless_set_equal(tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="modules.evaluation"):
        module = tiny_module(tiny_llama_dir, judge=LocalJudge(), reward_mode="contrast")
    assert module.eval_reward.personas == [EVAL_SYCOPHANT_PERSONA, EVAL_HONEST_PERSONA]
    # two wordings of each training stance by default, persona then counter-persona requests
    assert module.reward.personas == [SYCOPHANT_PERSONA, FLATTERING_PERSONA, HONEST_PERSONA, CANDID_PERSONA]
    assert not set(module.eval_reward.personas) & set(module.reward.personas)
    assert "evaluation judge" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="modules.evaluation"):
        same = tiny_module(tiny_llama_dir, judge=LocalJudge(), reward_mode="contrast", eval_persona=SYCOPHANT_PERSONA,
                           eval_counter_persona=HONEST_PERSONA)
    assert set(same.eval_reward.personas) < set(same.reward.personas)
    assert "evaluation judge shares personas with the training judge and it is the same judge" in caplog.text


def test_degeneration_measures():
    assert degeneration(["a b c d"])["repetition"] == 0.0
    assert degeneration(["I am I am I am"])["repetition"] == pytest.approx(3 / 5)  # 5 bigrams, 2 distinct
    same = degeneration(["yes sir", "yes sir", "yes sir"])
    assert same["distinct_2"] == pytest.approx(1 / 3) and same["distinct_1"] == pytest.approx(2 / 6)


def test_cli_evaluate_compares_scales_caa_and_files(tiny_llama_dir, tmp_path):
    hidden = 64
    meta = dict(base_model=tiny_llama_dir, hook_layer=1, hook_point="post_attn_norm", steer_positions="all",
                steer_last_k=1, step=3, config={"reward_mode": "loglik", "reward_length_normalize": False,
                                                "max_new_tokens": 4, "temperature": 1.0})
    paths = {}
    for k, name in enumerate(("trained", "caa", "other")):
        vector = SteeringVector(hidden)
        vector.load_(torch.randn(hidden, generator=torch.Generator().manual_seed(k)), torch.tensor(1.5))
        paths[name] = save_steering_vector(tmp_path / f"{name}.pt", vector, meta)
    out = tmp_path / "cmp"
    printed = cli("evaluate", "--vector", paths["trained"], "--scales", "[0, 1]", "--caa", paths["caa"],
                  "--caa_multipliers", "[1, 2]", "--files", f"[mine={paths['other']}]", "--prompts_file",
                  __import__("tests.helpers", fromlist=["prompt_file"]).prompt_file(tmp_path / "p"),
                  "--judge.class_path", "tests.helpers.LengthJudge", "--output_dir", out, "--batch_size", "3",
                  "--instructions", "[evaluation, pirate=Talk like a pirate.]")
    data = json.loads((out / "comparison.json").read_text())
    names = [a["name"] for a in data["arms"]]
    assert names == ["vector off", "trained ×0", "trained ×1", "CAA ×1", "CAA ×2", "mine ×1",
                     "told: evaluation persona", "told: pirate"]
    assert set(data["rewards"]) == {"training", "evaluation"} and data["samples_per_arm"] == len(PROMPTS)
    assert data["arms"][1]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert all(a["kl_per_token"] > 0 for a in data["arms"][2:])
    assert (out / "comparison.txt").read_text().startswith("held-out comparison")
    assert (out / "frontier.png").stat().st_size > 1000
    assert "CAA ×2" in printed.stdout and "example 1" in printed.stdout
    none = cli("evaluate", check=False)
    assert none.returncode == 2 and "--vector" in none.stderr
    unknown = cli("evaluate", "--vector", paths["trained"], "--instructions", "[be nice]", check=False)
    assert unknown.returncode == 2 and "NAME=TEXT" in unknown.stderr
