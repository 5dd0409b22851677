"""SARMFeaturePPO through the command line on a tiny random SARM: the shaped reward reaches PPO, the
latents reach the feature logger, the discriminator resumes exactly, bad input is one line."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from cli import main
from modules.sarm.human_latents import build_human_latents, save_human_latents
from modules.sarm.model import SARMRewardModel
from modules.sarm.random_sarm import write_random_sarm
from tests.helpers import PROMPTS, assert_refused, prompt_file
from tests.test_ppo import cli


@pytest.fixture(scope="module")
def sarm_files(tmp_path_factory, tokenizer_dir):
    """A random SARM on SmolLM2's tokenizer and a human-latent buffer built from a few demonstrations."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("sarm_ppo")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sarm = write_random_sarm(folder / "sarm", hidden_size=32, layers=2, latent_size=48, k=8, tokenizer=tokenizer,
                             use_topk=False, seed=5)
    demos = folder / "demos.jsonl"
    demos.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in
                               zip(PROMPTS, ["No, that is wrong.", "Let me check.", "It has issues.", "Not quite."] * 2)))
    payload = build_human_latents(SARMRewardModel.load(str(sarm), device="cpu"), str(demos))
    buffer = save_human_latents(payload, folder / "human.pt")
    return str(sarm), str(buffer)


def sarm_config(tmp_path: Path, model_dir: str, sarm: str, human: str, total: int, extra_callbacks=(), **reward):
    reward_args = dict(model=sarm, device="cpu", penalize_features=[3, 7], tau_values=[0.0], alpha_values=[0.5],
                       kl_beta=0.1, human_latents=human, disc_batch_size=4)
    reward_args.update(reward)
    config = {
        "seed_everything": 0, "output_dir": str(tmp_path / "runs"),
        "trainer": {"enable_progress_bar": False, "logger": {
            "class_path": "callbacks.resumable_csv.ResumableCSVLogger",
            "init_args": {"save_dir": str(tmp_path / "runs"), "name": "", "version": "csv"}},
            "callbacks": [
                {"class_path": "callbacks.checkpoints.EvenlySpacedCheckpoint", "init_args": {"num_checkpoints": 2}},
                {"class_path": "callbacks.feature_logging.FeatureActivationLogger", "init_args": {"top_k": 3}},
                *extra_callbacks]},
        "model": {"class_path": "modules.sarm_ppo.SARMFeaturePPO", "init_args": {
            "model": model_dir, "dtype": "float32", "lora_r": 4, "max_new_tokens": 3, "batch_size": 2,
            "grad_accum": 1, "total_updates": total, "lr": 0.02, "ppo_epochs": 2,
            "reward": {"class_path": "modules.sarm.reward.SARMReward", "init_args": reward_args}}},
        "data": {"class_path": "datamodules.prompts.PromptDataModule",
                 "init_args": {"train_file": prompt_file(tmp_path), "heldout_file": None}},
    }
    path = tmp_path / f"sarm_{len(list(tmp_path.glob('sarm_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_shaped_reward_features_and_exact_resume_of_the_discriminator(tiny_llama_dir, sarm_files, tmp_path):
    sarm, human = sarm_files
    config = sarm_config(tmp_path, tiny_llama_dir, sarm, human, total=4)
    cli("fit", "--config", config, "--run_name", "straight")
    crashing = sarm_config(tmp_path, tiny_llama_dir, sarm, human, total=4,
                           extra_callbacks=[{"class_path": "tests.crash_callback.CrashAt", "init_args": {"update": 3}}])
    assert cli("fit", "--config", crashing, "--run_name", "crashed", check=False).returncode == 17
    cli("fit", "--config", config, "--run_name", "crashed", "--ckpt_path", "last")
    a, b = (torch.load(tmp_path / "runs" / name / "checkpoints" / "last.ckpt", weights_only=False)
            for name in ("straight", "crashed"))
    disc_a, disc_b = a["on_policy"]["reward_state"]["discriminator"], b["on_policy"]["reward_state"]["discriminator"]
    assert disc_a.keys() == disc_b.keys() and len(disc_a) > 0
    for key, value in disc_a.items():  # weights, Adam state and generator of the discriminator, bit for bit
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, disc_b[key]), key
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    with open(tmp_path / "runs" / "csv" / "metrics.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r.get("reward/sarm")]
    assert rows, "no SARM rows logged"
    for name in ("reward/sarm", "reward/feature_penalty", "reward/kl_penalty", "sarm/kl_estimate", "sarm/disc_loss",
                 "features/3/rate", "features/7/mean", "features/top1/id"):
        assert rows[-1].get(name) not in (None, ""), name
    # the shaped reward is the SARM's minus the penalties
    last = rows[-1]
    assert float(last["reward/mean"]) == pytest.approx(
        float(last["reward/sarm"]) - float(last["reward/feature_penalty"]) - float(last["reward/kl_penalty"]), abs=1e-4)


@pytest.mark.parametrize("reward,message", [
    ({"penalize_features": [3, 99]}, "penalize_features"),
    ({"tau_values": [0.0, 1.0, 2.0]}, "tau_values"),
    ({"human_latents": "/no/such/buffer.pt"}, "human-latent buffer '/no/such/buffer.pt' does not exist"),
    ({"model": "/no/such/sarm"}, "/no/such/sarm"),
])
def test_bad_input_gets_one_clear_line(tiny_llama_dir, sarm_files, tmp_path, reward, message, capsys):
    sarm, human = sarm_files
    config = sarm_config(tmp_path, tiny_llama_dir, sarm, human, total=2, **reward)
    assert_refused(lambda: main(["fit", "--config", str(config), "--run_name", "bad"]), capsys, message,
                   tmp_path / "runs" / "bad")
