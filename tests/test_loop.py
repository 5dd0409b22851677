"""The shared on-policy loop: fresh rollouts from updated parameters, step counting, NaN and judge failures."""

import logging
import math

import lightning as L
import pytest
import torch

from datamodules.prompts import PromptSchedule, StartAt, encode_prompts, read_prompts
from modules.errors import UserError
from modules.run_guard import TrainingStopped
from tests.helpers import LengthJudge, PromptRecordingJudge, fit, loss_of, prompt_file, tiny_module


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
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingStopped, match="NaN/inf"):
        fit(module, tmp_path)
    assert torch.equal(module.steering_vector.v.detach(), before)
    assert module.skipped_updates == 2
    assert "skipped an optimizer step of update 1" in caplog.text


def test_failed_judge_calls_are_masked_and_counted(tiny_llama_dir, tmp_path):
    module = tiny_module(tiny_llama_dir, judge=LengthJudge(fail_every=2), batch_size=4, total_updates=2)
    recorder = Recorder()
    fit(module, tmp_path, [recorder])
    assert [m["judge/failed"] for m in recorder.metrics] == [2.0, 2.0]
    assert all(torch.isfinite(torch.tensor(m["reward/mean"])) for m in recorder.metrics)


def test_failed_sample_gets_no_gradient(tiny_llama_dir):
    """A masked sample changes nothing: the gradient equals that of the batch without it."""
    from modules.rewards import Rewards

    module = tiny_module(tiny_llama_dir, use_reward_normalization=False, kl_coef=0.0)
    batch = encode_prompts(module.tokenizer, ["a b c", "hello there", "third one"])
    rollout = module.rollout_micro_batch(batch, seed=1)

    def grad_of(valid):
        module.steering_vector.zero_grad()
        rewards = Rewards(torch.tensor([1.0, -2.0, 3.0]), torch.tensor(valid))
        loss, _ = loss_of(module, rollout, rewards)
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
    from modules.rewards import Rewards
    from modules.rollout import Rollout

    part = Rollout([rollout.prompts[i] for i in keep], rollout.prompt_ids[keep], rollout.prompt_mask[keep],
                   rollout.response_ids[keep], rollout.response_mask[keep], [rollout.responses[i] for i in keep])
    module.steering_vector.zero_grad()
    loss, _ = loss_of(module, part, Rewards(values, torch.tensor([True, True])))
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


# the loss of SteeringVectorRL on fixed tensors, recorded before the loop gained its score and
# advantage stages (same tiny model, vector and rollout): the refactor must not change it
PINNED_STEERING_LOSS = {  # (kl_estimator, z-score) -> (loss, |grad v|, grad alpha, kl/seq)
    ("exact", True): (7.545296669006348, 0.08524688333272934, -0.151308074593544, 0.016382038593292236),
    ("exact", False): (39.4338264465332, 0.1679375320672989, -0.15143609046936035, 0.016382038593292236),
    ("k3", True): (7.546135425567627, 0.08471547812223434, -0.15048351883888245, 0.02052815817296505),
    ("k3", False): (39.43466567993164, 0.1674451380968094, -0.15061290562152863, 0.02052815817296505),
    ("reward", True): (7.724698543548584, 0.08440084755420685, -0.1548508107662201, 0.02052815817296505),
    ("reward", False): (38.97343063354492, 0.16103458404541016, -0.1443587690591812, 0.02052815817296505),
}


@pytest.mark.parametrize("estimator,zscore", list(PINNED_STEERING_LOSS))
def test_steering_loss_is_pinned_on_fixed_tensors(tiny_llama_dir, estimator, zscore):
    from modules.rewards import Rewards
    from modules.rollout import Rollout

    torch.manual_seed(0)
    module = tiny_module(tiny_llama_dir, kl_estimator=estimator, use_reward_normalization=zscore, kl_coef=0.3,
                         temperature=0.8, init_std=0.0)
    with torch.no_grad():
        module.steering_vector.v.copy_(torch.sin(torch.arange(module.steering_vector.v.numel()).float()) * 2.0)
        module.steering_vector.alpha.fill_(1.5)
    prompt_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])
    rollout = Rollout(["a", "b", "c"], prompt_ids, (prompt_ids != 0).long(),
                      torch.tensor([[20, 21, 22, 2], [23, 24, 0, 0], [25, 26, 27, 28]]),
                      torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]), ["x", "y", "z"])
    loss, metrics = loss_of(module, rollout, Rewards(torch.tensor([1.0, -0.5, 2.0]), torch.tensor([True] * 3)))
    loss.backward()
    expected = PINNED_STEERING_LOSS[(estimator, zscore)]
    got = (loss.item(), module.steering_vector.v.grad.norm().item(), module.steering_vector.alpha.grad.item(),
           metrics["kl/seq"].item())
    assert got == pytest.approx(expected, rel=2e-4, abs=1e-6)  # BLAS thread counts move the last digits


def test_an_update_without_any_reward_takes_no_step_and_the_run_stops_with_the_judge_named(tiny_llama_dir, tmp_path,
                                                                                       caplog):
    module = tiny_module(tiny_llama_dir, judge=LengthJudge(fail_every=1), total_updates=5,
                         max_updates_without_signal=2)
    before = module.steering_vector.delta().detach().clone()
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingStopped) as stopped:
        fit(module, tmp_path)
    assert "2 updates in a row had no valid reward" in str(stopped.value) and "length" in str(stopped.value)
    assert module.updates_without_signal == 2 and module.rollout_batches_done == 1  # the second raised
    assert module.optimizers().optimizer.state == {}  # Adam never stepped: no momentum moved the vector
    assert torch.equal(module.steering_vector.delta().detach(), before)
    assert "had no valid reward" in caplog.text


def test_heldout_report_says_when_there_is_nothing_to_compare():
    from modules.evaluation import HeldOutReport

    empty = HeldOutReport(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, judge_failed=8)
    assert "no judge answers" in empty.format() and "0.0 tokens" not in empty.format()
    one = HeldOutReport(1, 0.5, 0.0, 0.2, 0.0, 0.3, 0.0, 0.0, 0.1, 0.1, 10.0, 11.0, judge_failed=0)
    assert "too few samples for a standard error: one sample" in one.format() and "inf" not in one.format()
    flat = HeldOutReport(4, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 10.0, 11.0, judge_failed=0)
    assert "identical rewards" in flat.format()
    real = HeldOutReport(32, 0.0115, 0.0147, -0.0554, 0.0132, 0.0668, 0.0198, 0.0171, 0.206, 6.3, 30.6, 31.8, 0)
    assert "on − off           : +0.0668 ± 0.0198 (Welch; +3.4 SE)" in real.format()
    assert "reward, vector off : -0.0554 ± 0.0132" in real.format()


def test_lr_schedules():
    from modules.experience import lr_factor

    assert [lr_factor(u, 10, 0, "constant") for u in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_factor(u, 10, 2, "constant") for u in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [lr_factor(u, 10, 0, "linear") for u in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert [lr_factor(u, 10, 0, "cosine") for u in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


def test_experience_rows_select_and_concat_with_their_padding():
    from modules.on_policy import Experience
    from modules.rewards import Rewards
    from modules.rollout import Rollout

    def part(prompt_ids, response_ids, rewards):
        rollout = Rollout([f"p{int(r)}" for r in rewards], prompt_ids, (prompt_ids != 0).long(), response_ids,
                          (response_ids != 0).long(), [f"r{int(r)}" for r in rewards], 1.0,
                          [{"i": int(r)} for r in rewards])
        per_token = response_ids.float()
        per_position = torch.cat([prompt_ids, response_ids], 1).float()[..., None].repeat(1, 1, 2)  # [B, P+R, 2]
        return Experience(rollout, Rewards(torch.tensor(rewards), torch.tensor([True] * len(rewards))),
                          torch.arange(len(rewards)),
                          {"logp": per_token, "row": torch.tensor(rewards), "layer_input": per_position})

    a = part(torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[3, 4], [5, 0]]), [1.0, 2.0])
    b = part(torch.tensor([[4]]), torch.tensor([[6, 7, 8]]), [3.0])
    merged = Experience.concat([a, b], pad_id=0)
    assert merged.rollout.prompt_ids.tolist() == [[0, 5, 6], [7, 8, 9], [0, 0, 4]]  # left-padded
    assert merged.rollout.response_ids.tolist() == [[3, 4, 0], [5, 0, 0], [6, 7, 8]]  # right-padded
    assert merged.scores["logp"].tolist() == [[3, 4, 0], [5, 0, 0], [6, 7, 8]]
    assert merged.scores["row"].tolist() == [1.0, 2.0, 3.0] and merged.rollout.seconds == 2.0
    # per position: each row's values stay beside its tokens (prompt left-, reply right-padded)
    assert merged.scores["layer_input"][..., 1].tolist() == [[0, 5, 6, 3, 4, 0], [7, 8, 9, 5, 0, 0], [0, 0, 4, 6, 7, 8]]
    picked = merged.select(torch.tensor([1, 0]))
    assert picked.rollout.prompt_ids.tolist() == [[7, 8, 9], [0, 5, 6]]
    assert picked.rollout.response_ids.tolist() == [[5, 0], [3, 4]]  # the all-padding column is gone
    assert picked.scores["logp"].shape == (2, 2) and picked.rollout.records == [{"i": 2}, {"i": 1}]
    assert picked.rewards.values.tolist() == [2.0, 1.0]
    assert picked.scores["layer_input"][..., 0].tolist() == [[7, 8, 9, 5, 0], [0, 5, 6, 3, 4]]
    short = merged.select(torch.tensor([2]))  # two all-padding prompt columns and nothing after the reply
    assert short.rollout.prompt_ids.tolist() == [[4]]
    assert short.scores["layer_input"][..., 0].tolist() == [[4, 6, 7, 8]]


def test_flat_rewards_are_reported_once(tiny_llama_dir, tmp_path, caplog):
    class ConstantJudge(LengthJudge):
        async def _score_uncached(self, requests):
            from modules.judges.base import Judgement

            return [Judgement(1.0, 1) for _ in requests]

    module = tiny_module(tiny_llama_dir, judge=ConstantJudge(), total_updates=2)
    with caplog.at_level(logging.WARNING):
        fit(module, tmp_path)
    assert caplog.text.count("learns nothing") == 1


class OutageJudge(LengthJudge):
    """A length judge that answers nothing while ``down`` is set."""

    def __init__(self):
        super().__init__()
        self.down = False

    async def _score_uncached(self, requests):
        return [None] * len(requests) if self.down else await super()._score_uncached(requests)


class Outages(L.Callback):
    """Takes the judge down during the given updates (1-based) and records what each update logged."""

    def __init__(self, judge: OutageJudge, updates: set[int]):
        self.judge, self.updates, self.logged = judge, updates, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.judge.down = module.rollout_batches_done + 1 in self.updates

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_scattered_judge_outages_do_not_stop_the_run_and_log_nothing_that_did_not_happen(tiny_llama_dir, tmp_path):
    judge = OutageJudge()
    module = tiny_module(tiny_llama_dir, judge=judge, total_updates=5, max_updates_without_signal=2)
    outages = Outages(judge, {2, 4})
    trainer = fit(module, tmp_path, [outages])  # two outages, never two in a row: the run must finish
    assert module.rollout_batches_done == 5 and module.updates_without_signal == 2 and trainer.global_step == 3
    for update, logged in enumerate(outages.logged, 1):
        stepped = update not in {2, 4}
        for name in ("loss/policy", "grad_norm", "time/update_s", "kl/token"):
            assert math.isfinite(logged[name]) == stepped, (update, name, logged[name])
        assert logged["updates_without_signal"] == (0, 1, 1, 2, 2)[update - 1]


def test_a_prompt_too_long_for_the_policy_is_cut_the_same_way_for_the_judge(tiny_llama_dir, tmp_path, caplog,
                                                                            monkeypatch):
    import datamodules.prompts

    monkeypatch.setattr(datamodules.prompts, "_warned_cut", False)
    judge = PromptRecordingJudge()
    module = tiny_module(tiny_llama_dir, judge=judge, total_updates=2)
    long_prompt = " ".join(f"word{i}" for i in range(4000)) + " so am I right?"
    prompts = tmp_path / "long.txt"
    prompts.write_text(f"{long_prompt}\n{long_prompt}\n")
    with caplog.at_level(logging.WARNING, logger="datamodules.prompts"):
        fit(module, tmp_path, train_file=str(prompts))
    assert len(caplog.records) == 1 and "cut from the left" in caplog.text  # said once, not per batch
    tokenizer = module.tokenizer
    assert judge.prompts and all(len(tokenizer(p)["input_ids"]) < 512 for p in judge.prompts)
    assert all(p.endswith("so am I right?") and long_prompt.endswith(p.strip()) for p in judge.prompts)
    batch = encode_prompts(tokenizer, [long_prompt, "short"], max_tokens=512)
    assert batch.input_ids.shape[1] <= 512 and batch.prompts[1] == "short" and batch.prompts[0] == judge.prompts[0]
    start = tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()][:3])
    template = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert start == tokenizer.decode(tokenizer(template, add_special_tokens=False)["input_ids"][:3])  # template kept
