"""Writes that fail or are cut short: no file under its real name is ever truncated, nothing is
left outside the run folder, a full disk keeps the last good checkpoint and says so."""

from __future__ import annotations

import errno
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from callbacks.checkpoints import EvenlySpacedCheckpoint
from modules.errors import UserError
from modules.files import atomic_path, save_figure_atomically, write_json_atomically, write_text_atomically
from tests.helpers import fit, tiny_module


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial")]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "report.json"
    write_text_atomically(path, "old\n")
    with pytest.raises(OSError):
        with atomic_path(path) as partial:
            partial.write_text("half a ")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old\n" and not _partials(tmp_path)


def test_json_reports_are_strict_json_with_null_for_what_was_not_measured(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomically(path, {"mean": float("nan"), "rows": [1.0, float("inf")], "n": 0})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"mean": None, "rows": [1.0, None], "n": 0}


@pytest.mark.parametrize("plot", ["curves", "reliability", "frontier"])
def test_a_plot_killed_mid_write_never_leaves_a_file_under_its_real_name(tmp_path, monkeypatch, plot):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    real = matplotlib.figure.Figure.savefig

    def dies_half_way(self, fname, *args, **kwargs):
        real(self, fname, *args, **kwargs)
        Path(fname).write_bytes(Path(fname).read_bytes()[:10])
        raise KeyboardInterrupt  # a kill in mid-write, as far as this process can tell

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dies_half_way)
    path = tmp_path / f"{plot}.png"
    with pytest.raises(KeyboardInterrupt):
        if plot == "curves":
            from callbacks.curves import TrainingCurves

            curves = TrainingCurves(["reward/mean"])
            curves.steps, curves.history = [1, 2], {"reward/mean": [0.1, 0.2]}
            curves._write_png(path)
        elif plot == "reliability":
            from modules.oracle.calibration import reliability_table, reliability_diagram

            reliability_diagram(reliability_table([0.2, 0.9], [0.0, 1.0]), path)
        else:
            import matplotlib.pyplot as plt

            save_figure_atomically(plt.figure(), path)
    assert not path.exists() and not _partials(tmp_path)


def test_checkpoints_are_staged_in_the_run_folder_not_in_tmpdir(tiny_llama_dir, tmp_path, monkeypatch):
    made = []
    real = tempfile.mkstemp

    def recording(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", recording)
    run = tmp_path / "run"
    fit(tiny_module(tiny_llama_dir, total_updates=2), run, [EvenlySpacedCheckpoint(num_checkpoints=2)])
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert [name for name in made if not Path(name).resolve().is_relative_to(run.resolve())] == []


def test_a_full_disk_keeps_the_last_good_checkpoint_and_says_so(tiny_llama_dir, tmp_path, monkeypatch):
    real = torch.save

    def disk_fills_at_update_4(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith("update000004.ckpt.partial"):
            f.write(b"PK half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_update_4)
    run = tmp_path / "run"
    with pytest.raises(UserError) as stopped:
        fit(tiny_module(tiny_llama_dir, total_updates=4), run, [EvenlySpacedCheckpoint(num_checkpoints=2)])
    last = run / "checkpoints" / "last.ckpt"
    assert "No space left on device" in str(stopped.value) and f"last good checkpoint is {last}" in str(stopped.value)
    assert torch.load(last, weights_only=False)["on_policy"]["rollout_batches_done"] == 2
    assert not (run / "checkpoints" / "update000004.ckpt").exists() and not _partials(run)


def test_a_heldout_report_with_no_scorable_sample_writes_no_number(tiny_llama_dir):
    from modules.evaluation import evaluate_intervention
    from tests.helpers import LengthJudge

    module = tiny_module(tiny_llama_dir, judge=LengthJudge(fail_every=1))
    report = evaluate_intervention(module, ["Is the sky green?", "Tell me I'm right."], progress=False)
    data = report.as_dict()
    assert report.samples_per_arm == 0 and report.judge_failed == 2
    for name in ("reward_on", "reward_off", "difference", "difference_se", "paired_se", "length_on"):
        assert math.isnan(data[name]), name
    assert data["verdict"].startswith("no judge answers: the reward failed for all 2 samples")
    assert "no judge answers" in report.format()
