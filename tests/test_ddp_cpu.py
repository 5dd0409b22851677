"""Two ranks on the CPU (Lightning's DDP over gloo, ``python cli.py fit --trainer.devices 2``): counts
of events are summed over ranks while means are averaged, and a run resumed from a checkpoint that
DDP wrote ends with the vector and counters of the uninterrupted run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from modules.update_log import counts_events, reduction_over_ranks
from tests.helpers import prompt_file
from tests.test_cli_and_checkpoints import cli

ROWS_PER_RANK = 4  # batch_size 2 x grad_accum 2: one judge request per row (loglik)


def _config(folder: Path, model_dir: str, train_file: str) -> Path:
    config = {
        "seed_everything": 0, "run_name": "r", "output_dir": str(folder / "runs"),
        "trainer": {"enable_progress_bar": False, "accelerator": "cpu", "devices": 2, "strategy": "ddp",
                    "callbacks": [{"class_path": "callbacks.checkpoints.EvenlySpacedCheckpoint",
                                   "init_args": {"num_checkpoints": 2}}]},
        "model": {"class_path": "modules.steering_rl.SteeringVectorRL",
                  "init_args": dict(model=model_dir, hook_layer=1, max_new_tokens=4, batch_size=2, grad_accum=2,
                                    total_updates=4, lr=0.05, init_std=0.01, reward_mode="loglik",
                                    judge_persona="You agree.",  # one persona: one request per row
                                    reward_length_normalize=False,
                                    # every second request of each rank fails: 2 of its 4 rows per update
                                    judge={"class_path": "tests.helpers.LengthJudge", "init_args": {"fail_every": 2}})},
        "data": {"class_path": "datamodules.prompts.PromptDataModule", "init_args": {"train_file": train_file}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra) -> Path:
    cli("fit", "--config", config, *extra)
    return config.parent / "runs" / "r"


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("reward/mean")]


def test_which_metrics_are_summed_over_ranks():
    assert all(counts_events(k) for k in ("judge/failed", "judge/requests", "judge/retries", "judge/cache_hits",
                                          "judge/failed_requests", "oracle/parse_failures",
                                          "oracle/parse_failure/no_tag"))
    assert not any(counts_events(k) for k in ("reward/mean", "reward/parse_failure", "oracle/parse_failure_rate",
                                              "judge/latency_s", "skipped_updates", "kl/token"))
    names = ("judge/failed", "memory/peak_gib", "reward/mean")
    assert [reduction_over_ranks(k) for k in names] == ["sum", "max", "mean"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_ranks_sum_counts_and_resume_exactly(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
    train_file = prompt_file(tmp_path / "data")
    straight = _fit(_config(tmp_path / "straight", tiny_llama_dir, train_file))
    rows = _rows(straight)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    for row in rows:  # summed, not averaged (averaging would give 4 and 2)
        assert float(row["judge/requests"]) == 2 * ROWS_PER_RANK
        assert float(row["judge/failed"]) == 2 * ROWS_PER_RANK / 2
        assert float(row["skipped_updates"]) == 0  # the same on every rank: averaged, not doubled

    resumed_dir = tmp_path / "resumed"
    resumed = _fit(_config(resumed_dir, tiny_llama_dir, train_file), "--ckpt_path",
                   straight / "checkpoints" / "update000002.ckpt")
    a, b = (torch.load(run / "steering_vector.pt", weights_only=True) for run in (straight, resumed))
    assert torch.equal(a["v"], b["v"]) and torch.equal(a["alpha"], b["alpha"])
    assert not torch.equal(a["v"], torch.load(straight / "vectors" / "update000002.pt", weights_only=True)["v"])
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["on_policy"]["rollout_batches_done"] == 4
    keys = ("step", "reward/mean", "judge/requests", "judge/failed", "kl/token")
    assert [[r[k] for k in keys] for r in _rows(resumed)[-2:]] == [[r[k] for k in keys] for r in rows[2:]]
