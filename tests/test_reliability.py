"""Bad input gets one line and leaves no file; reports never claim more than was measured.

The bad-input table runs ``cli.py fit`` in forked children (tests/forked_cli.py) on tiny models:
each case must exit with status 2, print exactly one ``error:`` line naming the field, no
traceback, and leave nothing behind (no run folder, config.yaml, hparams.yaml or wandb_id.txt).
"""

from __future__ import annotations

import json
import logging
import random
import time

import pytest
import torch

from modules.errors import UserError
from tests.forked_cli import run_cli
from tests.test_cli_and_checkpoints import write_config
from tests.test_ppo import ppo_config

PASTED_KEY = "sk-or-v1-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
LOCAL_JUDGE = ["--model.judge", "modules.judges.local.LocalJudge"]
OPENAI_JUDGE = ["--model.judge", "modules.judges.openai_compat.OpenAICompatibleJudge",
                "--model.judge.model", "j", "--model.judge.api_key_env", "RLI_TEST_NO_KEY"]

# (id, method, command-line arguments ({name} = a file made below), what the one error line says)
BAD_INPUT = [
    # the table
    ("random-bytes-txt", "steering", ["--data.train_file", "{random_txt}"], "is not UTF-8 text"),
    ("random-bytes-jsonl", "steering", ["--data.train_file", "{random_jsonl}"], "is not UTF-8 text"),
    ("ckpt-truncated", "steering", ["--ckpt_path", "{truncated_ckpt}"], "is truncated or not a checkpoint file"),
    ("ckpt-not-a-checkpoint", "steering", ["--ckpt_path", "{random_txt}"], "is truncated or not a checkpoint file"),
    ("temperature-0", "steering", ["--model.temperature", "0"], "temperature must be > 0"),
    ("kl_coef-negative", "steering", ["--model.kl_coef", "-1"], "kl_coef must be >= 0"),
    ("ckpt-missing", "steering", ["--ckpt_path", "/nope.ckpt"], "--ckpt_path /nope.ckpt does not exist"),
    ("wandb-with-bad-input", "steering", ["--model.temperature", "0", "--wandb_project", "x"], "temperature"),
    ("batch_size-0", "steering", ["--model.batch_size", "0"], "batch_size must be at least 1, got 0"),
    ("hub-id-offline", "steering", ["--model.model", "no/such-model"], "'no/such-model' is not in the local"),
    # SteeringVectorRL's own options and the loop's
    ("hook_layer-out-of-range", "steering", ["--model.hook_layer", "99"], "hook_layer 99 is out of range"),
    ("hook_point-unknown", "steering", ["--model.hook_point", "mlp"], "model.hook_point"),
    ("steer_last_k-0", "steering", ["--model.steer_last_k", "0"], "steer_last_k must be at least 1"),
    ("init_std-negative", "steering", ["--model.init_std", "-1"], "init_std must be >= 0"),
    ("top_p-0", "steering", ["--model.top_p", "0"], "top_p must be in (0, 1]"),
    ("max_grad_norm-negative", "steering", ["--model.max_grad_norm", "-1"], "max_grad_norm must be >= 0, got -1"),
    ("samples_per_prompt-split", "steering", ["--model.samples_per_prompt", "3"], "samples_per_prompt (3) must divide"),
    ("dtype-unknown", "steering", ["--model.dtype", "fp8"], "unknown dtype 'fp8'"),
    ("model-folder-missing", "steering", ["--model.model", "./no/such/model"], "model path './no/such/model'"),
    ("model-not-an-id", "steering", ["--model.model", "bad name"], "neither an existing path nor a Hub id"),
    # data
    ("heldout-random-bytes", "steering", ["--data.heldout_file", "{random_txt}"], "is not UTF-8 text"),
    ("prompts-empty", "steering", ["--data.train_file", "{empty_txt}"], "holds no prompts"),
    ("jsonl-without-prompt", "steering", ["--data.train_file", "{no_field_jsonl}"],
     "expected a JSON object with 'prompt'"),
    ("max_prompt_tokens-0", "steering", ["--data.max_prompt_tokens", "0"], "max_prompt_tokens must be at least 1"),
    # judges
    ("local-judge-model-missing", "steering", [*LOCAL_JUDGE, "--model.judge.model", "/no/such/judge"],
     "model path '/no/such/judge' does not exist"),
    ("local-judge-batch_size-0", "steering", [*LOCAL_JUDGE, "--model.judge.batch_size", "0"],
     "judge batch_size must be at least 1"),
    ("remote-judge-timeout-0", "steering", [*OPENAI_JUDGE, "--model.judge.base_url", "http://127.0.0.1:9/v1",
                                            "--model.judge.timeout_s", "0"], "judge timeout_s must be > 0"),
    ("remote-judge-url", "steering", [*OPENAI_JUDGE, "--model.judge.base_url", "localhost:8000"],
     "base_url 'localhost:8000' is not an http(s) URL"),
    ("checkpoints-0", "steering-no-checkpoints", [], "num_checkpoints must be at least 1"),
    ("heldout-samples_per_prompt-0", "steering-heldout-0", [], "samples_per_prompt must be at least 1, got 0"),
    # PPO's own options, adapter and reward-model paths
    ("ppo-kl_coef-negative", "ppo", ["--model.kl_coef", "-1"], "kl_coef must be >= 0"),
    ("ppo-temperature-0", "ppo", ["--model.temperature", "0"], "temperature must be > 0"),
    ("ppo-lora_alpha-0", "ppo", ["--model.lora_alpha", "0"], "lora_alpha must be > 0"),
    ("ppo-gamma", "ppo", ["--model.gamma", "2"], "gamma must be in [0, 1]"),
    ("ppo-adapter-missing", "ppo", ["--model.adapter_path", "/no/such/adapter"], "adapter path '/no/such/adapter'"),
    ("ppo-adapter-garbage", "ppo", ["--model.adapter_path", "{garbage_adapter}"], "could not load adapter"),
    ("ppo-reward-judge-missing", "ppo", ["--model.reward.judge", "modules.judges.local.LocalJudge",
                                         "--model.reward.judge.model", "/no/such/rm"], "model path '/no/such/rm'"),
    ("ppo-sarm-missing", "ppo", ["--model.reward", "modules.sarm.reward.SARMReward", "--model.reward.model",
                                 "/no/such/sarm"], "SARM folder '/no/such/sarm' does not exist"),
    ("ppo-train-random-bytes", "ppo", ["--data.train_file", "{random_jsonl}"], "is not UTF-8 text"),
    ("ppo-ckpt-truncated", "ppo", ["--ckpt_path", "{truncated_ckpt}"], "is truncated or not a checkpoint file"),
    # the trainer, the run folder, checkpoints of another method, a key where its variable's name belongs
    ("strategy-unknown", "steering", ["--trainer.strategy", "nonsense"], "unknown strategy 'nonsense'"),
    ("output_dir-is-a-file", "steering", ["--output_dir", "{random_txt}"], "random.txt is a file, not a folder"),
    ("output_dir-read-only", "steering", ["--output_dir", "/sys/rli-test-runs"], "/sys is not writable"),
    ("ckpt-of-another-method", "steering", ["--ckpt_path", "{ppo_ckpt}"], "does not fit SteeringVectorRL (written by PPO"),
    ("api_key_env-holds-a-key", "steering", [*OPENAI_JUDGE, "--model.judge.base_url", "http://localhost.:9/v1",
                                             "--model.judge.api_key_env", PASTED_KEY], "NAME of the environment"),
    ("api_key_env-holds-a-key-local", "steering", [*OPENAI_JUDGE, "--model.judge.base_url", "http://127.0.0.1:9/v1",
                                                   "--model.judge.api_key_env", PASTED_KEY], "not the key itself"),
]


@pytest.fixture
def bad_files(tmp_path) -> dict[str, str]:
    folder = tmp_path / "bad"
    folder.mkdir()
    rng = random.Random(16)
    noise = b"\xff\xfe" + bytes(rng.randrange(256) for _ in range(2000))
    files = {"random_txt": folder / "random.txt", "random_jsonl": folder / "random.jsonl",
             "empty_txt": folder / "empty.txt", "no_field_jsonl": folder / "rows.jsonl",
             "truncated_ckpt": folder / "update000002.ckpt", "garbage_adapter": folder / "adapter",
             "ppo_ckpt": folder / "ppo.ckpt"}
    files["random_txt"].write_bytes(noise)
    files["random_jsonl"].write_bytes(noise)
    files["empty_txt"].write_text("\n\n")
    files["no_field_jsonl"].write_text('{"question": "Is it?"}\n')
    torch.save({"state_dict": {"steering_vector.v": torch.zeros(64)}, "epoch": 0}, files["truncated_ckpt"])
    data = files["truncated_ckpt"].read_bytes()
    files["truncated_ckpt"].write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"policy.base_model.model.lm_head.lora_A.policy.weight": torch.zeros(4, 64)},
                "on_policy": {"method": "PPO", "rollout_batches_done": 2}}, files["ppo_ckpt"])
    files["garbage_adapter"].mkdir()
    (files["garbage_adapter"] / "adapter_config.json").write_text("{not json")
    return {name: str(path) for name, path in files.items()}


@pytest.mark.parametrize("method,args,message", [row[1:] for row in BAD_INPUT], ids=[row[0] for row in BAD_INPUT])
def test_bad_input_gets_one_line_exit_2_and_leaves_no_file(tiny_llama_dir, tmp_path, bad_files, monkeypatch,
                                                          method, args, message):
    monkeypatch.setenv("WANDB_MODE", "offline")  # a W&B logger is made whenever --wandb_project is given
    config_dir = tmp_path / "config"
    if method == "ppo":
        config = ppo_config(config_dir, tiny_llama_dir, total=2, checkpoints=2)
    else:
        heldout = [{"class_path": "callbacks.heldout.HeldOutEvaluation", "init_args": {"samples_per_prompt": 0}}]
        config = write_config(config_dir, tiny_llama_dir, total=2, checkpoints=0 if "no-checkpoints" in method else 2,
                              extra_callbacks=heldout if "heldout-0" in method else ())
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_cli("fit", "--config", config, "--output_dir", out, "--run_name", "bad",
                     *[a.format(**bad_files) for a in args])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and PASTED_KEY not in result.stderr + result.stdout
    assert not out.exists(), sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert not list(tmp_path.glob(".rli-write-check-*"))
    assert time.monotonic() - started < 60  # no retries against an unreachable Hub or judge


# -- Hub ids: fail at once, whatever the network ---------------------------------------------------

def test_hub_id_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    from huggingface_hub import constants

    from modules.models.loading import check_hub_id

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UserError, match=r"'no/such-model' is not in the local Hugging Face cache and "
                                        r"http://127.0.0.1:9 cannot be reached"):
        check_hub_id("no/such-model")
    assert time.monotonic() - started < 15


def test_hub_id_not_on_the_hub_is_named(monkeypatch):
    from huggingface_hub import constants

    from modules.models.loading import check_hub_id
    from tests.openai_server import FakeOpenAIServer

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeOpenAIServer() as server:  # answers 404 to /api/models/...: what the Hub says of a missing id
        monkeypatch.setattr(constants, "ENDPOINT", server.base_url.rsplit("/v1", 1)[0])
        with pytest.raises(UserError, match="'no/such-model' is not on the Hub"):
            check_hub_id("no/such-model")


# -- reports -----------------------------------------------------------------------------------------

def _report(n: int, on_se: float, off_se: float, difference: float, failed: int = 0):
    from modules.evaluation import HeldOutReport

    return HeldOutReport(n, 0.5 + difference, on_se, 0.5, off_se, difference, (on_se**2 + off_se**2) ** 0.5,
                         0.0, 0.1, 1.0, 10.0, 11.0, judge_failed=failed)


TOO_FEW = "too few samples for a standard error"


@pytest.mark.parametrize("report,printed,verdict", [
    (_report(0, 0.0, 0.0, 0.0, failed=6), "no judge answers",
     "no judge answers: the reward failed for all 6 samples, nothing to compare"),
    (_report(1, 0.0, 0.0, -0.3), f"-0.3000 ({TOO_FEW}: one sample)", f"{TOO_FEW}: one sample"),
    (_report(5, 0.0, 0.0, -0.3), f"-0.3000 ({TOO_FEW}: identical rewards within each arm)",
     f"{TOO_FEW}: identical rewards within each arm"),
    (_report(5, 0.03, 0.04, -0.3), "-0.3000 ± 0.0500 (Welch; -6.0 SE)", "-6.0 SE (Welch)"),
])
def test_heldout_report_and_its_json_carry_the_same_verdict(report, printed, verdict):
    text = report.format()
    assert printed in text and "inf" not in text and "nan" not in text
    if report.samples_per_arm == 1:
        assert "±" not in text  # one sample has no spread
    assert json.loads(json.dumps(report.as_dict()))["verdict"] == verdict


def test_rating_judge_warns_once_when_the_digits_hold_a_sliver_of_the_mass(caplog):
    from modules.judges.base import JudgeRequest
    from modules.judges.openai_compat import OpenAICompatibleJudge
    from tests.openai_server import FakeOpenAIServer, default_rater, wordy_rater

    requests = [JudgeRequest(system="Be kind.", prompt=f"Question {i}?", response=f"Answer {i}.") for i in range(12)]
    for rater, warned in ((default_rater, False), (wordy_rater, True)):
        caplog.clear()
        with FakeOpenAIServer(rater=rater) as server, caplog.at_level(logging.WARNING):
            judge = OpenAICompatibleJudge(base_url=server.base_url, model="judge-model", mode="rating",
                                          timeout_s=5, max_retries=0)
            try:
                first = judge.score_blocking(requests[:6])
                rest = judge.score_blocking(requests[6:])
            finally:
                judge.close()
        assert all(j is not None for j in first + rest)
        warnings = [r.getMessage() for r in caplog.records if "digits 0-9 hold only" in r.getMessage()]
        if warned:  # once, after enough replies to judge, with the share measured
            assert len(warnings) == 1 and "1.5%" in warnings[0] and "first 8 replies" in warnings[0], warnings
            assert [j.total for j in first + rest] == pytest.approx([(1 * 0.01 + 2 * 0.005) / 0.015] * 12)
        else:
            assert warnings == []
