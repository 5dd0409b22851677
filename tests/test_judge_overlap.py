"""A remote judge works while the next micro-batch is generated: an update costs about
max(generation, judge) + the loss pass (plus the last micro-batch's judge call), not their sum.

Measured through the real loop (SteeringVectorRL on a tiny model, one update of K micro-batches)
against a judge server on 127.0.0.1 that answers each request after a fixed delay, one request at a
time (``max_concurrency=1``), so that judging a micro-batch takes a known time. Generation is made
as slow as the judge with a sleep after each real rollout (a stand-in for a large model on a GPU that
does not load the shared CPU). With ``JudgeBatching`` the requests wait for the end of the rollouts:
that is the sum, for comparison.
"""

from __future__ import annotations

import time

import lightning as L
import pytest

from callbacks.judge_batching import JudgeBatching
from modules.judges.openai_compat import OpenAICompatibleJudge
from tests.helpers import fit, tiny_module
from tests.openai_server import FakeOpenAIServer

MICRO_BATCHES, ROWS, DELAY_S, GENERATION_S = 4, 2, 0.15, 0.3
JUDGE_S = MICRO_BATCHES * ROWS * DELAY_S  # one persona (loglik): one request per row, served one by one


class Times(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/")})


def _update_times(model_dir, tmp_path, batched: bool) -> dict[str, float]:
    with FakeOpenAIServer(delay_s=DELAY_S) as server:
        judge = OpenAICompatibleJudge(base_url=server.base_url, model="judge-model", max_concurrency=1,
                                      timeout_s=10.0)
        module = tiny_module(model_dir, judge=judge, batch_size=ROWS, grad_accum=MICRO_BATCHES, total_updates=1,
                             max_new_tokens=4, judge_persona="You agree.")  # one persona, as JUDGE_S counts
        real = module.rollout_micro_batch

        def slow_rollout(prompts, seed):
            out = real(prompts, seed)
            time.sleep(GENERATION_S)
            out.seconds += GENERATION_S
            return out

        module.rollout_micro_batch = slow_rollout
        times = Times()
        fit(module, tmp_path / ("batched" if batched else "overlap"),
            callbacks=[times] + ([JudgeBatching()] if batched else []))
        judge.close()
        assert len(server.posts("/completions")) >= MICRO_BATCHES * ROWS
    return times.rows[-1]


def test_remote_judging_overlaps_generation(tiny_llama_dir, tmp_path, capsys):
    overlap = _update_times(tiny_llama_dir, tmp_path, batched=False)
    summed = _update_times(tiny_llama_dir, tmp_path, batched=True)
    generation = overlap["time/generate_s"]
    loss = overlap["time/score_s"] + overlap["time/update_s"]
    with capsys.disabled():
        print(f"\njudge {JUDGE_S:.2f} s, generation {generation:.2f} s, loss {loss:.2f} s | update with overlap "
              f"{overlap['time/rollout_batch_s']:.2f} s (judge wait {overlap['time/judge_wait_s']:.2f} s) | judge "
              f"after generation {summed['time/rollout_batch_s']:.2f} s (wait {summed['time/judge_wait_s']:.2f} s)")
    tail = JUDGE_S / MICRO_BATCHES  # the last micro-batch's judge call cannot overlap anything
    assert summed["time/judge_wait_s"] > 0.9 * JUDGE_S  # the sum: every request after the rollouts
    assert overlap["time/judge_wait_s"] < tail + 0.5 * (JUDGE_S - tail)  # only the tail waits
    expected = max(generation, JUDGE_S) + tail + loss
    assert overlap["time/rollout_batch_s"] == pytest.approx(expected, abs=0.35 + 0.2 * expected)
    assert overlap["time/rollout_batch_s"] < summed["time/rollout_batch_s"] - 0.5 * (JUDGE_S - tail)
