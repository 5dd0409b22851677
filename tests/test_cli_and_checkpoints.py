"""The command line end to end on a tiny model: run folder, evenly spaced checkpoints, exact resume, errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli import main
from modules.models.steering_io import load_steered_model, read_steering_vector
from tests.helpers import prompt_file

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, model_dir: str, total: int, checkpoints: int, extra_callbacks=(), **model) -> Path:
    init = dict(model=model_dir, hook_layer=1, max_new_tokens=4, batch_size=2, total_updates=total, lr=0.05,
                init_std=0.01, judge={"class_path": "modules.judges.local.LocalJudge"})
    init.update(model)
    config = {
        "seed_everything": 0,
        "output_dir": str(tmp_path / "runs"),
        "trainer": {"enable_progress_bar": False, "callbacks": [
            {"class_path": "callbacks.checkpoints.EvenlySpacedCheckpoint", "init_args": {"num_checkpoints": checkpoints}},
            {"class_path": "callbacks.judge_batching.JudgeBatching"},
            *extra_callbacks]},
        "model": {"class_path": "modules.steering_rl.SteeringVectorRL", "init_args": init},
        "data": {"class_path": "datamodules.prompts.PromptDataModule",
                 "init_args": {"train_file": prompt_file(tmp_path), "heldout_file": None}},
    }
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_run_folder_checkpoints_and_export(tiny_llama_dir, tmp_path):
    config = write_config(tmp_path, tiny_llama_dir, total=10, checkpoints=10)
    cli("fit", "--config", config, "--run_name", "r")
    run = tmp_path / "runs" / "r"
    steps = sorted(p.name for p in (run / "checkpoints").glob("update*.ckpt"))
    assert steps == [f"update{s:06d}.ckpt" for s in range(1, 11)]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not list(run.rglob("*.partial"))
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    assert len(list((run / "vectors").glob("update*.pt"))) == 10
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == {"steering_vector.v", "steering_vector.alpha"}  # no frozen weights
    assert ckpt["global_step"] == 10 and ckpt["on_policy"]["rollout_batches_done"] == 10
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"reward/mean", "kl/token", "steer/alpha", "steer/v_norm", "response/length"} <= set(header)

    payload = read_steering_vector(run / "steering_vector.pt")
    assert torch.equal(payload["v"], ckpt["state_dict"]["steering_vector.v"])
    assert payload["metadata"]["hook_layer"] == 1 and payload["metadata"]["step"] == 10
    model, tokenizer, steering = load_steered_model(run / "steering_vector.pt")
    assert torch.equal(steering.vector.v, payload["v"])
    printed = cli("generate", "--vector", run / "steering_vector.pt", "--prompt", "Hello?", "--max_new_tokens", "3")
    assert "[off]" in printed.stdout and "[ on]" in printed.stdout

    again = cli("fit", "--config", config, "--run_name", "r", check=False)  # would mix two runs in one folder
    assert again.returncode == 2 and "--ckpt_path last" in again.stderr


def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_llama_dir, tmp_path):
    config = write_config(tmp_path, tiny_llama_dir, total=8, checkpoints=4)
    cli("fit", "--config", config, "--run_name", "straight")
    crashing = write_config(tmp_path, tiny_llama_dir, total=8, checkpoints=4,
                            extra_callbacks=[{"class_path": "tests.crash_callback.CrashAt", "init_args": {"update": 5}}])
    crashed = cli("fit", "--config", crashing, "--run_name", "crashed", check=False)
    assert crashed.returncode == 17
    run = tmp_path / "runs" / "crashed"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    cli("fit", "--config", config, "--run_name", "crashed", "--ckpt_path", "last")
    straight = read_steering_vector(tmp_path / "runs" / "straight" / "steering_vector.pt")
    resumed = read_steering_vector(run / "steering_vector.pt")
    assert torch.equal(straight["v"], resumed["v"]) and torch.equal(straight["alpha"], resumed["alpha"])
    a = torch.load(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a["optimizer_states"][0]["state"][0][key], b["optimizer_states"][0]["state"][0][key])


@pytest.mark.parametrize("override,message", [
    (["--data.train_file", "missing.txt"], "prompt file 'missing.txt' does not exist"),
    (["--model.model", "./no/such/model"], "does not exist"),
    (["--model.hook_layr", "3"], "Option 'hook_layr' is not accepted"),
    (["--model.hook_layer", "three"], "model.hook_layer: Expected a <class 'int'>"),
    (["--model.judge", "modules.judges.openai_compat.OpenAICompatibleJudge", "--model.judge.base_url",
      "http://127.0.0.1:9/v1", "--model.judge.model", "j", "--model.judge.timeout_s", "2"], "did not answer"),
])
def test_bad_input_gets_one_clear_line_and_no_run_folder(tiny_llama_dir, tmp_path, override, message, capsys):
    config = write_config(tmp_path, tiny_llama_dir, total=2, checkpoints=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--run_name", "bad", *override])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "runs" / "bad").exists()


def test_help_explains_every_field(tiny_llama_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_llama_dir, total=2, checkpoints=2)
    main(["fit", "--help"])
    shown = capsys.readouterr().out
    for text in ("--trainer.max_epochs", "--model.hook_layer", "Decoder layer (0-based)", "Weight of the KL",
                 "z-score rewards", "Rows per micro-batch", "--data.train_file", "--run_name",
                 "Passes over each rollout batch", "Fields of modules.ppo.PPO"):
        assert text in shown, text
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["hook_layer"] == 1


def test_remote_judge_run_keeps_the_key_out_of_every_file(tiny_llama_dir, tmp_path, monkeypatch):
    """A real run against an OpenAI-compatible judge on 127.0.0.1, logging to W&B offline: the key
    goes in the request header and nowhere else."""
    from tests.openai_server import FakeOpenAIServer

    pytest.importorskip("wandb")
    secret = "sk-test-SECRET-4242"
    monkeypatch.setenv("RLI_TEST_JUDGE_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with FakeOpenAIServer() as server:
        judge = {"class_path": "modules.judges.openai_compat.OpenAICompatibleJudge",
                 "init_args": {"base_url": server.base_url, "model": "toy", "mode": "echo",
                               "api_key_env": "RLI_TEST_JUDGE_KEY", "max_retries": 1}}
        config = write_config(tmp_path, tiny_llama_dir, total=2, checkpoints=2, judge=judge)
        env_run = subprocess.run([sys.executable, "cli.py", "fit", "--config", str(config), "--run_name", "remote",
                                  "--wandb_project", "rl-insides-test"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert env_run.returncode == 0, env_run.stderr[-3000:]
        sent = server.posts("/completions")
    assert sent and all(r.headers.get("authorization") == f"Bearer {secret}" for r in sent)
    run = tmp_path / "runs" / "remote"
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run missing"
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in env_run.stdout + env_run.stderr


def test_deepspeed_checkpoint_folders_are_replaced_and_resumable(tmp_path):
    """DeepSpeed writes a checkpoint as a folder: it replaces an older folder of the same name, and
    ``last`` resolves to it only when its ``latest`` tag names a subfolder holding model states."""
    from callbacks.checkpoints import _replace, checkpoint_problem, resolve_resume

    def deepspeed_folder(path, tag="global_step3"):
        (path / tag).mkdir(parents=True)
        (path / tag / "mp_rank_00_model_states.pt").write_bytes(b"states")
        (path / "latest").write_text(tag)
        return path

    checkpoints = tmp_path / "checkpoints"
    last = deepspeed_folder(checkpoints / "last.ckpt", "global_step1")
    deepspeed_folder(checkpoints / ".last.ckpt.partial", "global_step3")
    _replace(str(checkpoints / ".last.ckpt.partial"), str(last))
    assert (last / "latest").read_text() == "global_step3" and not (last / "global_step1").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert checkpoint_problem(last) is None
    assert resolve_resume("last", checkpoints) == (str(last), None)
    (last / "latest").write_text("global_step9")  # names a subfolder that is not there
    assert "without a complete DeepSpeed checkpoint" in checkpoint_problem(last)
