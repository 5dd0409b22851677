"""The shared on-policy loop: fresh rollouts from updated parameters, step counting, NaN and judge failures."""

import logging

import lightning as L
import pytest
import torch

from datamodules.prompts import PromptSchedule, StartAt, encode_prompts, read_prompts
from modules.errors import UserError
from tests.helpers import LengthJudge, fit, prompt_file, tiny_module


class Recorder(L.Callback):
    def __init__(self):
        self.deltas_after_step, self.metrics = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.deltas_after_step.append(module.steering_vector.delta().detach().cpu().clone())
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_each_rollout_uses_the_parameters_of_the_latest_update(tiny_llama_dir, tmp_path):
    module = tiny_module(tiny_llama_dir, total_updates=3)
    used_in_rollouts = []
    generate = module.rollout_micro_batch

    def spy(prompts, seed):
        used_in_rollouts.append(module.steering_vector.delta().detach().cpu().clone())
        return generate(prompts, seed)

    module.rollout_micro_batch = spy
    start = module.steering_vector.delta().detach().clone()
    recorder = Recorder()
    trainer = fit(module, tmp_path, [recorder])
    assert trainer.global_step == 3  # one optimizer step per update
    assert module.optimizers().optimizer.state[module.steering_vector.v]["step"] == 3
    assert torch.equal(used_in_rollouts[0], start)
    for k in (1, 2):
        assert torch.equal(used_in_rollouts[k], recorder.deltas_after_step[k - 1])
        assert not torch.equal(recorder.deltas_after_step[k], recorder.deltas_after_step[k - 1])
    logged = recorder.metrics[-1]
    for name in ("loss/policy", "reward/mean", "reward/std", "reward/ema", "kl/token", "kl/seq", "response/length",
                 "rollout/tokens_per_s", "judge/latency_s", "judge/failed", "steer/alpha", "steer/v_norm",
                 "time/update_s", "grad_norm"):
        assert name in logged, name


def test_grad_accumulation_takes_one_step_per_update(tiny_llama_dir, tmp_path):
    module = tiny_module(tiny_llama_dir, batch_size=2, grad_accum=3, total_updates=2)
    calls = []
    generate = module.rollout_micro_batch
    module.rollout_micro_batch = lambda prompts, seed: calls.append(len(prompts.prompts)) or generate(prompts, seed)
    trainer = fit(module, tmp_path)
    assert calls == [2] * 6 and trainer.global_step == 2


def test_a_nan_loss_skips_the_update_and_says_so(tiny_llama_dir, tmp_path, caplog):
    module = tiny_module(tiny_llama_dir, judge=LengthJudge(nan=True), use_reward_normalization=False,
                         max_skipped_updates=2)
    before = module.steering_vector.v.detach().clone()
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="NaN/inf"):
        fit(module, tmp_path, max_steps=5)
    assert torch.equal(module.steering_vector.v.detach(), before)
    assert module.skipped_updates == 2
    assert "skipped update" in caplog.text


def test_failed_judge_calls_are_masked_and_counted(tiny_llama_dir, tmp_path):
    module = tiny_module(tiny_llama_dir, judge=LengthJudge(fail_every=2), batch_size=4, total_updates=2)
    recorder = Recorder()
    fit(module, tmp_path, [recorder])
    assert [m["judge/failed"] for m in recorder.metrics] == [2.0, 2.0]
    assert all(torch.isfinite(torch.tensor(m["reward/mean"])) for m in recorder.metrics)


def test_failed_sample_gets_no_gradient(tiny_llama_dir):
    """A masked sample changes nothing: the gradient equals that of the batch without it."""
    from modules.judges.rewards import Rewards
    from modules.on_policy import Experience

    module = tiny_module(tiny_llama_dir, use_reward_normalization=False, kl_coef=0.0)
    batch = encode_prompts(module.tokenizer, ["a b c", "hello there", "third one"])
    rollout = module.rollout_micro_batch(batch, seed=1)

    def grad_of(valid):
        module.steering_vector.zero_grad()
        rewards = Rewards(torch.tensor([1.0, -2.0, 3.0]), torch.tensor(valid))
        loss, _ = module.micro_batch_loss(Experience(rollout, rewards))
        loss.backward()
        return module.steering_vector.v.grad.clone()

    with_failure = grad_of([True, False, True])
    assert not torch.equal(with_failure, grad_of([True, True, True]))
    module.steering_vector.zero_grad()
    # the same two valid samples alone (positions 0 and 2), via a rollout of just those prompts
    sub = encode_prompts(module.tokenizer, ["a b c", "third one"])
    torch.testing.assert_close(
        with_failure,
        _grad_for(module, sub, torch.tensor([1.0, 3.0]), rollout, keep=[0, 2]),
        rtol=1e-4, atol=1e-6,
    )


def _grad_for(module, sub, values, rollout, keep):
    from modules.judges.rewards import Rewards
    from modules.on_policy import Experience
    from modules.rollout import Rollout

    part = Rollout([rollout.prompts[i] for i in keep], rollout.prompt_ids[keep], rollout.prompt_mask[keep],
                   rollout.response_ids[keep], rollout.response_mask[keep], [rollout.responses[i] for i in keep])
    module.steering_vector.zero_grad()
    loss, _ = module.micro_batch_loss(Experience(part, Rewards(values, torch.tensor([True, True]))))
    loss.backward()
    return module.steering_vector.v.grad.clone()


def test_prompt_schedule_is_a_pure_function_of_the_batch_index(tmp_path):
    prompts = read_prompts(prompt_file(tmp_path))
    schedule = PromptSchedule(prompts, per_batch=3, seed=5)
    walk = [schedule[i][1] for i in range(8)]
    flat = [p for batch in walk for p in batch]
    assert sorted(flat[:8]) == sorted(prompts)  # each pass visits every prompt once
    assert PromptSchedule(prompts, 3, 5)[6] == schedule[6]
    it = iter(StartAt(lambda: 4))
    assert [next(it) for _ in range(3)] == [4, 5, 6]
    ranks = [iter(StartAt(lambda: 2, rank=r, world_size=2)) for r in (0, 1)]
    assert [next(ranks[0]), next(ranks[1])] == [4, 5]


def test_prompt_files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one"}\n\n{"messages": [{"role": "user", "content": "two"}]}\n')
    assert read_prompts(str(jsonl)) == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        read_prompts(str(tmp_path / "bad.jsonl"))


def test_shipped_prompt_sets():
    train = read_prompts("datamodules/data/sycophancy_train.txt")
    heldout = read_prompts("datamodules/data/sycophancy_heldout.txt")
    assert len(train) >= 200 and len(heldout) >= 48
    assert not set(train) & set(heldout)
