"""PPO on a LoRA policy: reference choice, fresh rollouts, exports, checkpoints, resume, data mode, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from cli import main
from modules.judges.rewards import PersonaReward
from modules.ppo import PPO
from modules.rewards import FieldReward
from tests.helpers import PROMPTS, LengthJudge, assert_refused, fit, prompt_file

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 6, 7, 8, 9]])


def length_reward():
    return PersonaReward(LengthJudge(), "loglik", "S", "H", length_normalize=False)


def tiny_ppo(model_dir: str, **overrides) -> PPO:
    options = dict(model=model_dir, dtype="float32", reward=length_reward(), lora_r=4, max_new_tokens=5,
                   batch_size=2, grad_accum=2, total_updates=2, lr=1e-2, ppo_epochs=2, num_minibatches=2)
    options.update(overrides)
    return PPO(**options)


def lora_weights(module: PPO) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.lora.trainable_state().items()}


def plain_logits(model_dir: str, adapter: str | None = None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(IDS).logits


def test_reference_is_the_base_for_a_fresh_adapter_and_the_start_adapter_otherwise(tiny_llama_dir, tmp_path):
    fresh = tiny_ppo(tiny_llama_dir, lr=0.05)
    fit(fresh, tmp_path)  # the adapter moves away from the identity
    with torch.no_grad():
        trained = fresh.policy(IDS).logits
        with fresh.reference():
            reference = fresh.policy(IDS).logits
    assert not torch.allclose(trained, reference, atol=1e-4)
    torch.testing.assert_close(reference, plain_logits(tiny_llama_dir), rtol=0, atol=1e-5)  # adapter off = base

    start = fresh.export_adapter(tmp_path / "start_adapter")
    resumed = tiny_ppo(tiny_llama_dir, adapter_path=str(start), lr=0.05)
    start_logits = plain_logits(tiny_llama_dir, str(start))
    fit(resumed, tmp_path / "second")
    with torch.no_grad():
        moved = resumed.policy(IDS).logits
        with resumed.reference():
            reference = resumed.policy(IDS).logits
        with resumed.interventions_off():
            base = resumed.policy(IDS).logits
    torch.testing.assert_close(reference, start_logits, rtol=0, atol=1e-5)  # the frozen starting adapter
    assert not torch.allclose(moved, start_logits, atol=1e-4)
    torch.testing.assert_close(base, plain_logits(tiny_llama_dir), rtol=0, atol=1e-5)
    frozen = [n for n, p in resumed.policy.named_parameters() if ".reference." in n]
    assert frozen and not any(p.requires_grad for n, p in resumed.policy.named_parameters() if ".reference." in n)


def test_rollouts_after_an_update_use_the_updated_adapter(tiny_llama_dir, tmp_path):
    module = tiny_ppo(tiny_llama_dir, total_updates=3, lr=0.05)
    seen, after_update = [], []
    sample = module.rollout_micro_batch

    def spy(prompts, seed):
        seen.append(lora_weights(module))
        return sample(prompts, seed)

    module.rollout_micro_batch = spy
    module.on_train_batch_end = lambda *args: after_update.append(lora_weights(module))
    trainer = fit(module, tmp_path)
    assert module.rollout_batches_done == 3 and trainer.global_step == 3 * 2 * 2  # epochs x minibatches
    for k in (1, 2):  # both micro-batches of update k+1 sample with the weights after update k
        for micro in (2 * k, 2 * k + 1):
            assert all(torch.equal(seen[micro][n], after_update[k - 1][n]) for n in seen[micro])
        assert any(not torch.equal(after_update[k][n], after_update[k - 1][n]) for n in after_update[k])


class OptimizerSpy(L.Callback):
    """Wraps the optimizer's step and zero_grad (as the module sees it) in counting mocks."""

    def on_train_start(self, trainer, pl_module):
        from unittest import mock

        opt = pl_module.optimizers()
        self.step = mock.MagicMock(wraps=opt.step)
        self.zero_grad = mock.MagicMock(wraps=opt.zero_grad)
        opt.step, opt.zero_grad = self.step, self.zero_grad


def test_every_optimizer_step_goes_through_the_step_helper(tiny_llama_dir, tmp_path):
    """backward / step / zero_grad counts for 2 epochs x 2 minibatches of 2 chunks."""
    from unittest import mock

    module = tiny_ppo(tiny_llama_dir, batch_size=1, grad_accum=4, total_updates=1)
    spy = OptimizerSpy()
    with mock.patch.object(module, "manual_backward", wraps=module.manual_backward) as backward:
        fit(module, tmp_path, [spy])
    assert backward.call_count == 2 * 2 * 2  # epochs x minibatches x chunks of batch_size rows
    assert spy.step.call_count == 2 * 2
    assert spy.zero_grad.call_count == 2 * 2 * 2  # before and after each step


def test_precomputed_rewards_mode_trains_on_the_rows(tiny_llama_dir, tmp_path):
    rows = [{"prompt": p, "response": f"reply {i}", "reward": float(i % 3)} for i, p in enumerate(PROMPTS)]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    module = tiny_ppo(tiny_llama_dir, rollouts="from_data", reward=FieldReward("reward"), lr=0.05)
    start = lora_weights(module)
    seen = []
    sample = module.rollout_micro_batch
    module.rollout_micro_batch = lambda prompts, seed: seen.append(sample(prompts, seed)) or seen[-1]
    fit(module, tmp_path, train_file=str(data))
    by_prompt = {r["prompt"]: r for r in rows}
    assert seen and all(by_prompt[p]["response"] == text for r in seen for p, text in zip(r.prompts, r.responses))
    assert any(not torch.equal(start[n], w) for n, w in lora_weights(module).items())
    last = module.last_experiences[0]
    assert last.rewards.values.tolist() == [by_prompt[p]["reward"] for p in last.rollout.prompts]


# -- the command line --------------------------------------------------------------------------

def ppo_config(tmp_path: Path, model_dir: str, total: int, checkpoints: int, extra_callbacks=(), data=None,
               **model) -> Path:
    init = dict(model=model_dir, dtype="float32", lora_r=4, max_new_tokens=3, batch_size=1, grad_accum=2,
                total_updates=total, lr=0.02, ppo_epochs=2, num_minibatches=2,
                reward={"class_path": "modules.judges.rewards.PersonaReward",
                        "init_args": {"judge": {"class_path": "tests.helpers.LengthJudge"}, "mode": "loglik",
                                      "length_normalize": False}})
    init.update(model)
    config = {
        "seed_everything": 0,
        "output_dir": str(tmp_path / "runs"),
        "trainer": {"enable_progress_bar": False, "callbacks": [
            {"class_path": "callbacks.checkpoints.EvenlySpacedCheckpoint", "init_args": {"num_checkpoints": checkpoints}},
            *extra_callbacks]},
        "model": {"class_path": "modules.ppo.PPO", "init_args": init},
        "data": {"class_path": "datamodules.prompts.PromptDataModule",
                 "init_args": {"train_file": data or prompt_file(tmp_path), "heldout_file": None}},
    }
    path = tmp_path / f"ppo_{len(list(tmp_path.glob('ppo_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args, check=True) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_checkpoints_count_updates_and_exports_load_in_plain_peft(tiny_llama_dir, tmp_path):
    cli("fit", "--config", ppo_config(tmp_path, tiny_llama_dir, total=10, checkpoints=10), "--run_name", "r")
    run = tmp_path / "runs" / "r"
    assert sorted(p.name for p in (run / "checkpoints").glob("update*.ckpt")) == \
        [f"update{u:06d}.ckpt" for u in range(1, 11)]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 10 * 2 * 2 and ckpt["on_policy"]["rollout_batches_done"] == 10
    keys = set(ckpt["state_dict"])
    assert keys == {k for k in keys if ".lora_" in k or k.startswith("value_head.")}  # no frozen base weights
    assert {"value_head.linear.weight", "value_head.linear.bias"} <= keys and len(keys) > 2
    assert len(list((run / "adapters").iterdir())) == 10
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "adapter" / "value_head.pt").is_file()

    module = tiny_ppo(tiny_llama_dir)
    module.load_state_dict(ckpt["state_dict"], strict=False)
    with torch.no_grad():
        expected = module.policy(IDS).logits
    torch.testing.assert_close(plain_logits(tiny_llama_dir, str(run / "adapter")), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, plain_logits(tiny_llama_dir), atol=1e-4)
    value_head = torch.load(run / "adapter" / "value_head.pt", weights_only=True)
    assert torch.equal(value_head["linear.weight"], ckpt["state_dict"]["value_head.linear.weight"])


def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_llama_dir, tmp_path):
    config = ppo_config(tmp_path, tiny_llama_dir, total=4, checkpoints=2)
    cli("fit", "--config", config, "--run_name", "straight")
    crashing = ppo_config(tmp_path, tiny_llama_dir, total=4, checkpoints=2,
                          extra_callbacks=[{"class_path": "tests.crash_callback.CrashAt", "init_args": {"update": 3}}])
    assert cli("fit", "--config", crashing, "--run_name", "crashed", check=False).returncode == 17
    run = tmp_path / "runs" / "crashed"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["on_policy"]["rollout_batches_done"] == 2
    cli("fit", "--config", config, "--run_name", "crashed", "--ckpt_path", "last")
    a = torch.load(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4 * 2 * 2  # updates x epochs x minibatches
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # LoRA weights and value head, bit for bit
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for index, state in a["optimizer_states"][0]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], b["optimizer_states"][0]["state"][index][name])
    rows = [list(csv_rows(tmp_path / "runs" / name / "metrics.csv")) for name in ("straight", "crashed")]
    assert [r["reward/mean"] for r in rows[0]] == [r["reward/mean"] for r in rows[1]] and len(rows[0]) == 4


def csv_rows(path: Path):
    import csv

    with open(path, newline="") as file:
        yield from (row for row in csv.DictReader(file) if row.get("reward/mean"))


def _rows_file(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


BAD_INPUT = [
    ({"adapter_path": "/no/such/adapter"}, None, "adapter path '/no/such/adapter' holds no adapter_config.json"),
    ({"lora_target_modules": "not_a_layer"}, None, "lora_target_modules"),
    ({"ppo_epochs": 0}, None, "ppo_epochs must be at least 1"),
    ({"num_minibatches": 3}, None, "num_minibatches (3) must split the rollout batch of 2 rows"),
    ({"kl_coef": -1.0}, None, "kl_coef must be >= 0"),
    ({"rollouts": "from_data", "reward": {"class_path": "modules.rewards.FieldReward"}},
     [{"prompt": "p", "response": "r", "reward": "high"}], "train data row 1: 'reward' must be a number, got 'high'"),
    ({"rollouts": "from_data", "reward": {"class_path": "modules.rewards.FieldReward"}},
     [{"prompt": "p", "reward": 1.0}], "needs a text field 'response'"),
    ({"rollouts": "from_data", "reward": {"class_path": "modules.rewards.FieldReward"}},
     [{"prompt": "p", "response": "r"}], "train data row 1: 'reward' must be a number, got missing"),
]


@pytest.mark.parametrize("model,rows,message", BAD_INPUT)
def test_bad_input_gets_one_clear_line_and_no_run_folder(tiny_llama_dir, tmp_path, model, rows, message, capsys):
    data = _rows_file(tmp_path, rows) if rows else None
    config = ppo_config(tmp_path, tiny_llama_dir, total=2, checkpoints=2, data=data, **model)
    assert_refused(lambda: main(["fit", "--config", str(config), "--run_name", "bad"]), capsys, message,
                   tmp_path / "runs" / "bad")
