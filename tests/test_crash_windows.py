"""A kill at any write of an update, then ``fit --ckpt_path last``, gives the run folder of an
uninterrupted run: every metrics row, every export and checkpoint, the held-out report, no junk.

Each run is a forked ``cli.main`` (tests/forked_cli.py); ``CrashAtWrite`` (tests/crash_callback.py)
kills it during or right after one named write. Runs have 4 updates with checkpoints after updates
2 and 4, and a held-out report at the end. What an update writes, in order: its ``metrics.csv`` row;
at a checkpoint, the export (``vectors/update*.pt`` or ``adapters/update*/``; at the end also
``steering_vector.pt`` or ``adapter/``), ``checkpoints/update*.ckpt``, ``checkpoints/last.ckpt``;
after the last update, the held-out report.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.crash_callback import CRASH_STATUS
from tests.forked_cli import run_cli
from tests.helpers import PROMPTS, prompt_file

VOLATILE = ("time/", "rollout/tokens_per_s", "judge/latency_s")  # wall-clock measurements


def _callbacks(extra=()):
    return [{"class_path": "callbacks.checkpoints.EvenlySpacedCheckpoint", "init_args": {"num_checkpoints": 2}},
            {"class_path": "callbacks.heldout.HeldOutEvaluation",
             "init_args": {"samples_per_prompt": 1, "batch_size": 2, "show_examples": 1}},
            {"class_path": "callbacks.curves.TrainingCurves", "init_args": {"png": False}}, *extra]


def write_run_config(folder: Path, model: dict, data_dir: Path, extra_callbacks=()) -> Path:
    """A 4-update run in ``folder/runs/r`` (the same data for every run of a test)."""
    heldout = data_dir / "heldout.txt"
    heldout.write_text("\n".join(PROMPTS[:2]) + "\n")
    config = {
        "seed_everything": 0, "run_name": "r", "output_dir": str(folder / "runs"),
        "trainer": {"enable_progress_bar": False, "callbacks": _callbacks(extra_callbacks)},
        "model": model,
        "data": {"class_path": "datamodules.prompts.PromptDataModule",
                 "init_args": {"train_file": prompt_file(data_dir), "heldout_file": str(heldout)}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"config_{len(list(folder.glob('config_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def steering_model(model_dir: str) -> dict:
    return {"class_path": "modules.steering_rl.SteeringVectorRL",
            "init_args": dict(model=model_dir, hook_layer=1, max_new_tokens=4, batch_size=2, total_updates=4,
                              lr=0.05, init_std=0.01, judge={"class_path": "modules.judges.local.LocalJudge"})}


def ppo_model(model_dir: str) -> dict:
    reward = {"class_path": "modules.judges.rewards.PersonaReward",
              "init_args": {"judge": {"class_path": "tests.helpers.LengthJudge"}, "mode": "loglik",
                            "length_normalize": False}}
    return {"class_path": "modules.ppo.PPO",
            "init_args": dict(model=model_dir, dtype="float32", lora_r=4, max_new_tokens=3, batch_size=1,
                              grad_accum=2, total_updates=4, lr=0.02, ppo_epochs=2, num_minibatches=2,
                              reward=reward)}


def crash_at(target: str, when: str = "during", update: int = 4) -> dict:
    return {"class_path": "tests.crash_callback.CrashAtWrite",
            "init_args": {"update": update, "target": target, "when": when}}


def fit(config: Path, *extra) -> "object":
    return run_cli("fit", "--config", config, *extra)


# -- comparing run folders -------------------------------------------------------------------------

def _files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*")
            if p.is_file() and p.relative_to(run).parts[0] != "tensorboard"}


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        rows = [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in reader]
        return [k for k in reader.fieldnames if not k.startswith(VOLATILE)], rows


def _same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run_folder(straight: Path, resumed: Path) -> None:
    """Same files (TensorBoard's event files aside), rows (wall-clock columns aside), exports,
    checkpoints (trainable state, optimizer, counters, RNG) and held-out reports."""
    files = _files(straight)
    assert _files(resumed) == files
    assert not [p for p in resumed.rglob("*") if p.name.endswith(".partial")]
    assert _csv(resumed / "metrics.csv") == _csv(straight / "metrics.csv")
    for name in files:
        a, b = straight / name, resumed / name
        if name.endswith(".ckpt"):
            ca, cb = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
            for key in ("state_dict", "optimizer_states", "lr_schedulers", "on_policy", "global_step"):
                _same_tensors(ca.get(key), cb.get(key), f"{name}:{key}")
            rows = [[s.get("csv_rows") for s in c["callbacks"].values() if "csv_rows" in s] for c in (ca, cb)]
            assert rows[0] == rows[1], name
        elif name.endswith((".pt", ".safetensors")):
            load = (lambda p: torch.load(p, map_location="cpu", weights_only=True)) if name.endswith(".pt") else \
                (lambda p: __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(p)))
            _same_tensors(load(a), load(b), name)
        elif name.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text()), name
        elif name == "config.yaml":
            texts = [p.read_text().replace(str(run.parent.parent), "<ROOT>")  # where, and how it was started
                     .replace("ckpt_path: last", "ckpt_path: null") for p, run in ((a, straight), (b, resumed))]
            assert texts[0] == texts[1]
        elif name.endswith(".yaml"):
            assert a.read_text() == b.read_text(), name


def assert_one_row_per_update(run: Path, updates: int = 4) -> None:
    """One training row per update (steps 0..updates-1, none twice) and the held-out row last."""
    rows = _csv(run / "metrics.csv")[1]
    assert [r["step"] for r in rows if r.get("reward/mean")] == [str(s) for s in range(updates)]
    assert [r["step"] for r in rows if r.get("heldout/samples_per_arm")] == [str(updates - 1)]
    assert rows[-1].get("heldout/samples_per_arm")


# -- SteeringVectorRL ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def steering_straight(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("steering")
    result = fit(write_run_config(root / "straight", steering_model(tiny_llama_dir), root))
    assert result.returncode == 0, result.stderr[-3000:]
    run = root / "straight" / "runs" / "r"
    assert {f"vectors/update00000{u}.pt" for u in (2, 4)} <= _files(run)
    assert_one_row_per_update(run)
    return root, run


STEERING_WINDOWS = [  # (update whose writes are counted, destination, during or after the write)
    (3, "metrics.csv", "during"),                  # an update between checkpoints
    (4, "metrics.csv", "during"),                  # the row written ahead of its checkpoint
    (4, "vectors/update000004.pt", "during"),      # the row before must survive, no .partial left
    (4, "steering_vector.pt", "during"),
    (4, "checkpoints/update000004.ckpt", "during"),
    (4, "checkpoints/last.ckpt", "during"),        # after update*.ckpt, while last.ckpt is written
    (4, "checkpoints/last.ckpt", "after"),         # before Lightning logs the update's row
    (4, "heldout_update000004.json", "during"),    # the end-of-training report
]


@pytest.mark.parametrize("update,target,when", STEERING_WINDOWS,
                         ids=[f"{w}-{t.replace('/', '_')}-u{u}" for u, t, w in STEERING_WINDOWS])
def test_steering_kill_at_a_write_then_resume_gives_the_uninterrupted_folder(steering_straight, update, target,
                                                                             when, tmp_path):
    root, straight = steering_straight
    crashed = fit(write_run_config(tmp_path, steering_model_of(root), root, [crash_at(target, when, update)]))
    assert crashed.returncode == CRASH_STATUS, crashed.stderr[-3000:]
    assert f"[crash] {when}" in crashed.stderr and target in crashed.stderr.splitlines()[-1]
    resumed = fit(write_run_config(tmp_path, steering_model_of(root), root), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert_same_run_folder(straight, tmp_path / "runs" / "r")


def steering_model_of(root: Path) -> dict:
    """The straight run's model section (same tiny model)."""
    config = yaml.safe_load((root / "straight" / "config_0.yaml").read_text())
    return config["model"]


def test_last_missing_resumes_from_the_newest_update_checkpoint_and_says_so(steering_straight, tmp_path):
    """Killed while the first last.ckpt was written: update000002.ckpt is the only checkpoint."""
    root, straight = steering_straight
    crashed = fit(write_run_config(tmp_path, steering_model_of(root), root,
                                   [crash_at("checkpoints/last.ckpt", "during", update=2)]))
    assert crashed.returncode == CRASH_STATUS
    run = tmp_path / "runs" / "r"
    assert not (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "update000002.ckpt").exists()
    for junk in (run / "vectors" / ".update000003.pt.partial", run / ".metrics.csv.partial"):
        junk.write_bytes(b"half a file")  # what kills in other windows leave; no later write replaces these
    (run / "adapters" / ".update000002.partial").mkdir(parents=True)
    resumed = fit(write_run_config(tmp_path, steering_model_of(root), root), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notes = [line for line in resumed.stderr.splitlines() if line.startswith("note: resuming")]
    assert len(notes) == 1 and "update000002.ckpt" in notes[0] and "last.ckpt does not exist" in notes[0]
    assert_same_run_folder(straight, run)


def test_truncated_last_resumes_from_the_newest_readable_checkpoint_and_names_the_bad_file(steering_straight,
                                                                                           tmp_path):
    root, straight = steering_straight
    crashed = fit(write_run_config(tmp_path, steering_model_of(root), root, [crash_at("checkpoints/last.ckpt")]))
    assert crashed.returncode == CRASH_STATUS
    last = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    os.truncate(last, last.stat().st_size // 3)  # damaged after the fact (a full disk, a bad copy)
    resumed = fit(write_run_config(tmp_path, steering_model_of(root), root), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notes = [line for line in resumed.stderr.splitlines() if line.startswith("note: resuming")]
    assert len(notes) == 1 and "update000004.ckpt" in notes[0] and f"{last} is truncated" in notes[0], notes
    assert "Traceback" not in resumed.stderr
    assert_same_run_folder(straight, tmp_path / "runs" / "r")


def test_last_with_no_checkpoint_at_all_starts_over_and_says_so(steering_straight, tmp_path):
    root, straight = steering_straight
    crashed = fit(write_run_config(tmp_path, steering_model_of(root), root,
                                   [crash_at("checkpoints/update000002.ckpt", "during", update=2)]))
    assert crashed.returncode == CRASH_STATUS
    resumed = fit(write_run_config(tmp_path, steering_model_of(root), root), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "note: no readable checkpoint in" in resumed.stderr and "training from the first update" in resumed.stderr
    assert_same_run_folder(straight, tmp_path / "runs" / "r")


def test_a_checkpoint_given_by_name_resumes_with_the_options_given(steering_straight, tmp_path):
    """As with ``last``: the checkpoint's saved hyperparameters do not replace the command line's."""
    root, straight = steering_straight
    start = tmp_path / "update000002.ckpt"
    start.write_bytes((straight / "checkpoints" / "update000002.ckpt").read_bytes())
    resumed = fit(write_run_config(tmp_path, steering_model_of(root), root), "--ckpt_path", start,
                  "--model.kl_coef", "0.5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["kl_coef"] == 0.5
    assert yaml.safe_load((run / "hparams.yaml").read_text())["kl_coef"] == 0.5  # what the module was built with
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["on_policy"]["rollout_batches_done"] == 4


# -- PPO -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ppo_straight(tiny_llama_dir, tmp_path_factory):
    pytest.importorskip("peft")  # imported here once rather than in every forked run
    root = tmp_path_factory.mktemp("ppo")
    result = fit(write_run_config(root / "straight", ppo_model(tiny_llama_dir), root))
    assert result.returncode == 0, result.stderr[-3000:]
    run = root / "straight" / "runs" / "r"
    assert {"adapters/update000002/adapter_config.json", "adapter/value_head.pt"} <= _files(run)
    assert_one_row_per_update(run)
    return root, run


PPO_WINDOWS = [
    (4, "adapters/update000004", "during"),  # a PEFT folder cut short
    (4, "checkpoints/last.ckpt", "after"),
]


@pytest.mark.parametrize("update,target,when", PPO_WINDOWS,
                         ids=[f"{w}-{t.replace('/', '_')}-u{u}" for u, t, w in PPO_WINDOWS])
def test_ppo_kill_at_a_write_then_resume_gives_the_uninterrupted_folder(ppo_straight, update, target, when,
                                                                        tmp_path):
    root, straight = ppo_straight
    model = yaml.safe_load((root / "straight" / "config_0.yaml").read_text())["model"]
    crashed = fit(write_run_config(tmp_path, model, root, [crash_at(target, when, update)]))
    assert crashed.returncode == CRASH_STATUS, crashed.stderr[-3000:]
    assert target in crashed.stderr.splitlines()[-1]
    resumed = fit(write_run_config(tmp_path, model, root), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run_folder(straight, tmp_path / "runs" / "r")
