"""OracleGRPO in the loop: reference vs subject, groups, one extraction per group, exports, resume, bad input."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from cli import main
from datamodules.prompts import read_records
from modules.errors import UserError
from modules.models.adapters import LoRAPolicy
from modules.oracle_grpo import OracleGRPO, runs_of_same_row
from tests.helpers import assert_refused, fit
from tests.test_ppo import cli, length_reward

TRAIN = "datamodules/data/oracle_train.jsonl"
IDS = torch.tensor([[5, 6, 7, 8, 9]])


@pytest.fixture(scope="module")
def start_adapter(tiny_llama_dir, tmp_path_factory):
    """A non-trivial LoRA adapter on the tiny model (no ao_config.json: no scheme to refuse)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lora = LoRAPolicy(base, r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return str(lora.save(tmp_path_factory.mktemp("oracle") / "start"))


def tiny_oracle(model_dir: str, adapter: str, **overrides) -> OracleGRPO:
    options = dict(model=model_dir, dtype="float32", adapter_path=adapter, batch_size=4, grad_accum=2,
                   samples_per_prompt=2, total_updates=2, max_new_tokens=4, lr=0.05, num_positions=2,
                   format_system_prompt="Reply as [epistemic status: X] Answer.")
    options.update(overrides)
    return OracleGRPO(**options)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_reference_is_the_start_adapter_and_adapter_off_is_the_subject(tiny_llama_dir, start_adapter, tmp_path):
    from peft import PeftModel

    # a random tiny oracle never writes the format, so the reward here is the reply's length
    module = tiny_oracle(tiny_llama_dir, start_adapter, beta=0.1, reward=length_reward())
    fit(module, tmp_path, train_file=TRAIN, jsonl_field="question")
    start = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), start_adapter))
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    with module.reference():
        torch.testing.assert_close(logits(module.policy), start, rtol=0, atol=1e-5)
    with module.interventions_off():
        torch.testing.assert_close(logits(module.policy), base, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(module.policy), start, atol=1e-4)  # the trained oracle moved
    assert not torch.allclose(start, base, atol=1e-4)  # the subject is not the reference


def test_groups_are_sampled_together_and_extracted_once(tiny_llama_dir, start_adapter, tmp_path, monkeypatch):
    import modules.oracle_grpo as oracle_grpo

    built, groups = [], []
    original = oracle_grpo.build_oracle_batch
    monkeypatch.setattr(oracle_grpo, "build_oracle_batch",
                        lambda model, tok, records, *a, **k: built.append(len(records)) or original(model, tok, records, *a, **k))
    module = tiny_oracle(tiny_llama_dir, start_adapter, samples_per_prompt=4, total_updates=1)
    sample = module.rollout_micro_batch

    def spy(prompts, seed):
        out = sample(prompts, seed)
        groups.append([r["question"] + r["context"] for r in out.records])
        return out

    module.rollout_micro_batch = spy
    fit(module, tmp_path, train_file=TRAIN, jsonl_field="question")
    assert built == [1, 1]  # one distinct row (a group of 4) per micro-batch of 4: extracted once each
    assert all(len(set(g)) == 1 and len(g) == 4 for g in groups)
    assert module.last_experiences[0].group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(UserError, match="samples_per_prompt \\(3\\) must divide batch_size \\(4\\)"):
        tiny_oracle(tiny_llama_dir, start_adapter, samples_per_prompt=3)


def test_dapo_steps_divide_by_the_rollout_batch_tokens_of_every_rank(tiny_llama_dir, start_adapter, tmp_path):
    """Two optimizer steps per update and a second rank simulated by a reduce that doubles (a twin
    rank): every step's totals count both ranks, and dapo's the whole rollout batch's tokens."""
    module = tiny_oracle(tiny_llama_dir, start_adapter, loss_type="dapo", num_minibatches=2, total_updates=1,
                         update_batch_size=2, reward=length_reward())
    module.reduce_sum = lambda tensor: 2 * tensor
    seen, aggregate = [], module.aggregate
    module.aggregate = lambda loss, weight, totals: seen.append(totals) or aggregate(loss, weight, totals)
    fit(module, tmp_path, train_file=TRAIN, jsonl_field="question")
    batch = module.last_experiences[0]
    tokens = int((batch.rollout.response_mask.cpu() * batch.valid[:, None]).sum())
    assert len(seen) == 2 * 2 and batch.valid.all()  # 2 steps x 2 chunks of 2 rows
    for totals in seen:
        assert totals.world_size == 2 and totals.num_micro_batches == 2
        assert totals.generation_tokens == 2 * tokens  # not one step's (about half of it), not one rank's
        assert totals.num_replies == 2 * 4  # the step's 4 valid replies on each rank


def test_a_group_of_one_reply_is_refused_at_construction():
    with pytest.raises(UserError, match="GRPO needs samples_per_prompt >= 2, got 1"):
        OracleGRPO(model="no-such-model", samples_per_prompt=1, batch_size=2)  # refused before any loading


def test_runs_of_same_row():
    a, b = {"q": 1}, {"q": 1}  # equal but distinct rows stay distinct
    assert runs_of_same_row([a, a, b, b, b]) == ([a, b], [0, 0, 1, 1, 1])


def test_checkpoints_write_adapters_and_reliability(tiny_llama_dir, start_adapter, tmp_path):
    from callbacks.checkpoints import EvenlySpacedCheckpoint

    module = tiny_oracle(tiny_llama_dir, start_adapter)
    fit(module, tmp_path, [EvenlySpacedCheckpoint(num_checkpoints=2, dirpath=str(tmp_path / "run" / "checkpoints"))],
        train_file=TRAIN, jsonl_field="question")
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["update000001", "update000002"]
    assert (run / "adapter" / "adapter_config.json").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(".lora_" in k and ".default." in k for k in ckpt["state_dict"])  # not the frozen reference copy
    for update in (1, 2):  # every reply of the random tiny oracle fails to parse: an empty table, still written
        report = json.loads((run / "reliability" / f"update{update:06d}.json").read_text())
        assert report["update"] == update and report["replies"] == 8


def oracle_config(tmp_path: Path, model_dir: str, adapter: str, total: int, extra_callbacks=(), data=TRAIN,
                  **model) -> Path:
    init = dict(model=model_dir, dtype="float32", adapter_path=adapter, batch_size=2, grad_accum=1,
                samples_per_prompt=2, total_updates=total, max_new_tokens=3, lr=0.05, num_positions=2, beta=0.1,
                num_iterations=2, format_system_prompt="Reply as [epistemic status: X] Answer.",
                reward={"class_path": "modules.judges.rewards.PersonaReward",  # the reply's length: a signal
                        "init_args": {"judge": {"class_path": "tests.helpers.LengthJudge"}, "mode": "loglik",
                                      "length_normalize": False}})
    init.update(model)
    config = {
        "seed_everything": 0, "output_dir": str(tmp_path / "runs"),
        "trainer": {"enable_progress_bar": False, "callbacks": [
            {"class_path": "callbacks.checkpoints.EvenlySpacedCheckpoint", "init_args": {"num_checkpoints": 2}},
            *extra_callbacks]},
        "model": {"class_path": "modules.oracle_grpo.OracleGRPO", "init_args": init},
        "data": {"class_path": "datamodules.prompts.PromptDataModule",
                 "init_args": {"train_file": data, "heldout_file": None, "jsonl_field": "question"}},
    }
    path = tmp_path / f"oracle_{len(list(tmp_path.glob('oracle_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_llama_dir, start_adapter, tmp_path):
    config = oracle_config(tmp_path, tiny_llama_dir, start_adapter, total=4)
    cli("fit", "--config", config, "--run_name", "straight")
    crashing = oracle_config(tmp_path, tiny_llama_dir, start_adapter, total=4,
                             extra_callbacks=[{"class_path": "tests.crash_callback.CrashAt", "init_args": {"update": 3}}])
    assert cli("fit", "--config", crashing, "--run_name", "crashed", check=False).returncode == 17
    cli("fit", "--config", config, "--run_name", "crashed", "--ckpt_path", "last")
    a, b = (torch.load(tmp_path / "runs" / name / "checkpoints" / "last.ckpt", weights_only=False)
            for name in ("straight", "crashed"))
    assert a["global_step"] == b["global_step"] == 4 * 2  # updates x iterations
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for index, state in a["optimizer_states"][0]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer_states"][0]["state"][index]["exp_avg_sq"])


def _rows(tmp_path: Path, drop: str) -> str:
    rows = read_records(TRAIN, "question")[:4]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k not in (drop, "prompt")}) for r in rows))
    return str(path)


@pytest.mark.parametrize("model,drop,message", [
    ({"layer_percents": [150]}, None, "150"),
    ({"samples_per_prompt": 3}, None, "samples_per_prompt (3) must divide batch_size (2)"),
    ({"samples_per_prompt": 1}, None, "GRPO needs samples_per_prompt >= 2, got 1"),
    ({"loss_type": "ppo"}, None, "model.loss_type: Expected a typing.Literal"),
    ({}, "context", "train data row 1: an oracle row needs a non-empty 'context'"),
    ({"reward": {"class_path": "modules.oracle.reward.OracleReward"}}, "answer",
     "train data row 1: the oracle reward needs 'answer'"),
])
def test_bad_input_gets_one_clear_line(tiny_llama_dir, start_adapter, tmp_path, model, drop, message, capsys):
    data = _rows(tmp_path, drop) if drop else TRAIN
    config = oracle_config(tmp_path, tiny_llama_dir, start_adapter, total=2, data=data, **model)
    assert_refused(lambda: main(["fit", "--config", str(config), "--run_name", "bad"]), capsys, message,
                   tmp_path / "runs" / "bad")


def test_an_adapter_of_another_scheme_is_refused(tiny_llama_dir, start_adapter, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(start_adapter, other)
    (other / "ao_config.json").write_text(json.dumps({"hook_onto_layer": 5, "special_token": " ?"}))
    with pytest.raises(UserError, match="layer 5|hook_onto_layer"):
        tiny_oracle(tiny_llama_dir, str(other))


def test_gradient_checkpointing_injects_again_when_it_recomputes_the_injected_layer(tiny_llama_dir, start_adapter):
    """The loss pass's backward recomputes the injected layer under gradient checkpointing: it must add the
    same vectors again, so the gradient equals the one without checkpointing."""
    from datamodules.prompts import encode_prompts, read_records
    from modules.on_policy import Experience
    from modules.rewards import Rewards
    from modules.rl import grpo

    records = read_records("datamodules/data/oracle_train.jsonl", "question")[:2]
    grads, injected = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = tiny_oracle(tiny_llama_dir, start_adapter, gradient_checkpointing=checkpointing)
        if checkpointing:  # what on_fit_start does
            module.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        prompts = encode_prompts(module.tokenizer, [r["prompt"] for r in records])
        prompts.records = records
        rollout = module.rollout_micro_batch(prompts.repeat(2), seed=0)
        experience = Experience(rollout, Rewards(torch.tensor([1.0, 0.0, 3.0, 1.0]), torch.ones(4, dtype=torch.bool)),
                                torch.tensor([0, 0, 1, 1]))
        module.compute_advantages(experience)
        totals = grpo.update_totals([rollout.response_mask], [experience.valid], module.sampling.max_new_tokens)
        before = module.injection.calls
        loss = module.chunk_loss(experience, 0, totals)[0]
        forward_calls = module.injection.calls - before
        loss.backward()
        injected[checkpointing] = (forward_calls, module.injection.calls - before - forward_calls)
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in module.trainable_parameters()])
    assert injected[False][0] > 0 and injected[False][1] == 0  # the loss pass injects; no recomputation
    # where transformers recomputes a layer through its hooks, the backward injects again; where it
    # recomputes the layer's forward alone, the hook's addition is outside the recomputed part
    assert injected[True][1] in (0, injected[True][0])
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
