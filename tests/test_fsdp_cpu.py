"""``--trainer.strategy fsdp2`` (FSDP2, the project's ``fsdp``) on two CPU ranks over gloo, for every
method: the sharded run trains the same trainable state as DDP on the same data and seeds (to float
rounding), its checkpoints hold that state whole (DDP resumes from them, and FSDP2 from DDP's, Adam's
moments included), its exports hold the same tensors, and a run resumed from its mid checkpoint
under FSDP2 ends exactly where it would have."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import prompt_file
from tests.test_cli_and_checkpoints import cli
from tests.test_oracle_grpo import TRAIN, oracle_config, start_adapter  # noqa: F401  (fixture)
from tests.test_sarm_ppo import sarm_config, sarm_files  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")

LENGTH_REWARD = {"class_path": "modules.judges.rewards.PersonaReward",
                 "init_args": {"judge": {"class_path": "tests.helpers.LengthJudge"}, "mode": "loglik",
                               "length_normalize": False}}


def _steering(tmp: Path, model_dir: str, **_) -> Path:
    return _write(tmp, {
        "model": {"class_path": "modules.steering_rl.SteeringVectorRL",
                  "init_args": dict(model=model_dir, hook_layer=1, max_new_tokens=4, batch_size=2, grad_accum=2,
                                    total_updates=4, lr=0.05, init_std=0.01, reward_mode="loglik",
                                    reward_length_normalize=False,
                                    judge={"class_path": "tests.helpers.LengthJudge"})},
        "data": {"class_path": "datamodules.prompts.PromptDataModule",
                 "init_args": {"train_file": prompt_file(tmp / "data")}}})


def _ppo(tmp: Path, model_dir: str, **_) -> Path:
    return _write(tmp, {
        "model": {"class_path": "modules.ppo.PPO",
                  "init_args": dict(model=model_dir, dtype="float32", lora_r=4, max_new_tokens=3, batch_size=2,
                                    grad_accum=1, total_updates=4, lr=0.02, ppo_epochs=2, num_minibatches=2,
                                    reward=LENGTH_REWARD)},
        "data": {"class_path": "datamodules.prompts.PromptDataModule",
                 "init_args": {"train_file": prompt_file(tmp / "data")}}})


def _oracle(tmp: Path, model_dir: str, adapter: str, **_) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    return _write(tmp, yaml.safe_load(oracle_config(tmp, model_dir, adapter, total=4, data=TRAIN).read_text()))


def _sarm(tmp: Path, model_dir: str, sarm: tuple[str, str], **_) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    return _write(tmp, yaml.safe_load(sarm_config(tmp, model_dir, *sarm, total=4).read_text()))


def _write(tmp: Path, config: dict) -> Path:
    config.update({"seed_everything": 0, "run_name": "r", "output_dir": str(tmp / "runs")})
    config.setdefault("trainer", {}).update({
        "enable_progress_bar": False, "accelerator": "cpu", "devices": 2,
        "callbacks": [{"class_path": "callbacks.checkpoints.EvenlySpacedCheckpoint",
                       "init_args": {"num_checkpoints": 4}}]})
    config["trainer"].pop("logger", None)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, strategy: str, *extra) -> Path:
    cli("fit", "--config", config, "--trainer.strategy", strategy, *extra)
    return config.parent / "runs" / "r"


def _trained(run: Path, name: str = "last.ckpt") -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / name, weights_only=False)["state_dict"]


METHODS = {"steering": (_steering, "steering_vector.pt"), "ppo": (_ppo, "adapter"),
           "oracle": (_oracle, "adapter"), "sarm": (_sarm, "adapter")}


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_trains_what_ddp_trains_and_resumes_exactly(method, tiny_llama_dir, start_adapter, sarm_files,
                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
    build, export = METHODS[method]
    args = dict(adapter=start_adapter, sarm=sarm_files)
    ddp = _run(build(tmp_path / "ddp", tiny_llama_dir, **args), "ddp")
    sharded = _run(build(tmp_path / "fsdp2", tiny_llama_dir, **args), "fsdp2")
    # after two updates: later, Adam's normalisation turns last-bit differences of the gradient
    # reductions (reduce-scatter vs all-reduce) on near-zero gradient entries into whole steps
    a, b = _trained(ddp, "update000002.ckpt"), _trained(sharded, "update000002.ckpt")
    assert a.keys() == b.keys() and a  # the trainable state, gathered whole
    for key in a:
        assert b[key].shape == a[key].shape, key
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-3, msg=lambda m: f"{key}: {m}")
    difference = sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5
    assert difference <= 1e-3 * sum(float(a[k].norm()) ** 2 for k in a) ** 0.5
    first = _trained(ddp, "update000001.ckpt")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # the second update moved it: not a comparison of starts

    straight = _trained(sharded)
    exported = _export_tensors(sharded / export)
    kept = sorted(float(t.float().pow(2).sum()) for k, t in straight.items() if EXPORTED[method](k))
    assert len(exported) == len(kept) and exported == pytest.approx(kept, rel=1e-6)  # whole tensors, this state

    resumed = _run(build(tmp_path / "resumed", tiny_llama_dir, **args), "fsdp2", "--ckpt_path",
                   sharded / "checkpoints" / "update000002.ckpt")
    again = _trained(resumed)
    assert all(torch.equal(again[k], straight[k]) for k in straight)
    if method == "steering":  # checkpoints are whole: each strategy resumes the other's, Adam's moments included
        under_ddp = _run(build(tmp_path / "to_ddp", tiny_llama_dir, **args), "ddp", "--ckpt_path",
                         sharded / "checkpoints" / "update000002.ckpt")
        under_fsdp = _run(build(tmp_path / "to_fsdp", tiny_llama_dir, **args), "fsdp2", "--ckpt_path",
                          ddp / "checkpoints" / "update000002.ckpt")
        for run, reference in ((under_ddp, straight), (under_fsdp, _trained(ddp))):
            for key, value in _trained(run).items():
                torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-6)


EXPORTED = {"steering": lambda key: key.startswith("steering_vector."),
            "ppo": lambda key: "lora_" in key or key.startswith("value_head."),
            "oracle": lambda key: "lora_" in key, "sarm": lambda key: "lora_" in key or key.startswith("value_head.")}


def _export_tensors(path: Path) -> list[float]:
    """Sums of squares of an export's tensors, sorted (names differ between the formats)."""
    from safetensors.torch import load_file

    if path.suffix == ".pt":
        tensors = [t for k, t in torch.load(path, weights_only=True).items() if k in ("v", "alpha")]
    else:
        tensors = list(load_file(str(path / "adapter_model.safetensors")).values())
        if (path / "value_head.pt").exists():
            tensors += list(torch.load(path / "value_head.pt", weights_only=True).values())
    return sorted(float(t.float().pow(2).sum()) for t in tensors)


def test_strategy_names_and_the_zero3_4bit_refusal():
    from lightning.pytorch.strategies import StrategyRegistry

    from modules.errors import UserError
    from modules.strategies import FSDP2Strategy, check_strategy, register_strategies

    register_strategies()
    assert StrategyRegistry["fsdp"]["strategy"] is FSDP2Strategy and StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy
    for name in ("deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3"):
        assert StrategyRegistry[name]["init_params"]["exclude_frozen_parameters"] is True  # no frozen base in checkpoints
    assert StrategyRegistry["deepspeed_stage_2_offload"]["init_params"]["offload_optimizer"] is True  # kept

    class ZeRO3:  # DeepSpeed itself is not installed on the CPU test machines
        zero_stage_3 = True

    class Params4bit(torch.nn.Parameter):  # what bitsandbytes' 4-bit weights are called
        pass

    four_bit, bf16 = torch.nn.Module(), torch.nn.Linear(2, 2)
    four_bit.register_parameter("weight", Params4bit(torch.zeros(2), requires_grad=False))
    with pytest.raises(UserError, match="deepspeed_stage_3 cannot shard a 4-bit"):
        check_strategy(ZeRO3(), four_bit)
    with pytest.raises(UserError, match="fsdp cannot shard a 4-bit"):
        check_strategy(FSDP2Strategy(), four_bit)
    check_strategy(ZeRO3(), bf16)  # ZeRO-3 and FSDP with a dense base train
    check_strategy(FSDP2Strategy(), bf16)
    check_strategy(object(), four_bit)  # a 4-bit base under any other strategy too
