"""The rollout engine under FSDP2 (two CPU ranks over gloo): on the gathered weights it samples the
tokens, with the logits, that it samples on the same model unsharded (LoRA and steering inside);
it refuses the shards themselves; and FSDP2 finds its weights as it left them (forward after the
rollout equals the unsharded model's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from datamodules.prompts import encode_prompts
from modules.engine import RolloutEngine, Unsupported
from modules.models.adapters import LoRAPolicy
from modules.models.loading import load_causal_lm
from modules.models.steering import Steering, SteeringVector
from tests.engine_helpers import PROMPTS, generate_args, plain_logits
from tests.helpers import free_port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
RANKS, NEW_TOKENS, SEED = 2, 8, 3


class Policy(nn.Module):
    """A LoRA policy (adapter acting) with a steering vector at layer 1, built the same on every call."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        super().__init__()
        base, self.tokenizer = load_causal_lm(model_dir, "float32")
        base.to(device)
        torch.manual_seed(0)
        self.lora = LoRAPolicy(base, r=4, alpha=8)
        self.model = self.lora.model
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)  # a fresh adapter is the identity: make it act
        self.vector = SteeringVector(self.model.config.hidden_size, alpha_init=1.5).to(device)
        with torch.no_grad():
            self.vector.v.copy_(torch.randn(self.vector.v.shape, generator=torch.Generator().manual_seed(1)))
        self.steering = Steering(self.model, self.vector, 1, "post_attn_norm", "all")
        self.model.eval()
        self.engine = RolloutEngine(self.model)

    def fused_groups(self) -> int:
        return sum(group is not None for layer in self.engine._projections for group in layer)

    def update(self) -> None:
        """What an optimizer step does: the adapter's values change in place (on a rank, its shards)."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "lora_A" in name:
                    param.mul_(2.0)

    def prompts(self):
        batch = encode_prompts(self.tokenizer, PROMPTS)
        device = self.vector.v.device
        batch.input_ids, batch.attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        return batch

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Engine tokens and logits, and a plain forward's logits for those tokens."""
        batch = self.prompts()
        args = generate_args(self.model, self.tokenizer, batch, NEW_TOKENS, seed=SEED, keep_logits=True)
        out = self.engine.generate(**args)
        with torch.no_grad():
            logits, mask = plain_logits(self.model, batch.input_ids, batch.attention_mask, out.tokens, args["stop_ids"])
        return out.tokens, out.logits[mask], logits[mask]


def _worker(rank: int, port: int, model_dir: str, folder: str, ranks: int, device: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from modules.sharding import gathered, shard_for_fsdp2

    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    try:
        policy = Policy(model_dir, device)
        shard_for_fsdp2(policy, policy.model, init_device_mesh(device, (ranks,)))
        batch = policy.prompts()
        args = generate_args(policy.model, policy.tokenizer, batch, NEW_TOKENS, seed=SEED)
        try:
            policy.engine.generate(**args)
            refused = ""
        except Unsupported as why:
            refused = str(why)
        with gathered(policy):
            tokens, engine_logits, _ = policy.sample()
        fused = policy.fused_groups()  # FSDP2 owns the gathered weights' storage: none laid out anew
        policy.update()
        with gathered(policy):  # the next rollout: gathered anew, with the updated adapter
            updated_tokens, updated_logits, _ = policy.sample()
        sharded = all(isinstance(p, DTensor) for layer in policy.model.base_model.model.model.layers
                      for p in layer.parameters())
        with torch.no_grad():  # FSDP2's own forward, gathering layer by layer, after the rollouts
            forward_logits, mask = plain_logits(policy.model, batch.input_ids, batch.attention_mask, tokens,
                                                args["stop_ids"])
        torch.save({"refused": refused, "fused": fused, "tokens": tokens, "engine_logits": engine_logits,
                    "sharded_after": sharded, "updated_tokens": updated_tokens, "updated_logits": updated_logits,
                    "forward_logits": forward_logits[mask], "graphs": policy.engine.captures},
                   Path(folder) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_sharded_engine(model_dir: str, folder: Path, ranks: int, device: str, atol: float) -> list[dict]:
    policy = Policy(model_dir, device)
    tokens, engine_logits, forward_logits = policy.sample()
    assert (engine_logits - forward_logits).abs().max() < atol  # the unsharded engine is exact
    assert policy.fused_groups() > 0  # unsharded, the LoRA groups are fused
    policy.update()
    updated_tokens, updated_logits, _ = policy.sample()
    batch = policy.prompts()
    with torch.no_grad():
        logits, mask = plain_logits(policy.model, batch.input_ids, batch.attention_mask, tokens,
                                    generate_args(policy.model, policy.tokenizer, batch)["stop_ids"])
    updated_forward_logits = logits[mask]  # the first rollout's tokens, read by the updated policy
    assert (updated_forward_logits - forward_logits).abs().max() > 1e-2  # the update acted
    mp.start_processes(_worker, args=(free_port(), model_dir, str(folder), ranks, device), nprocs=ranks, join=True,
                       start_method="spawn")
    results = []
    for rank in range(ranks):
        got = torch.load(folder / f"rank{rank}.pt", map_location="cpu")
        assert "FSDP2 shards" in got["refused"], got["refused"]
        assert got["fused"] == 0
        assert torch.equal(got["tokens"], tokens.cpu())
        torch.testing.assert_close(got["engine_logits"], engine_logits.cpu(), rtol=0, atol=atol)
        assert torch.equal(got["updated_tokens"], updated_tokens.cpu())
        torch.testing.assert_close(got["updated_logits"], updated_logits.cpu(), rtol=0, atol=atol)
        assert got["sharded_after"]
        torch.testing.assert_close(got["forward_logits"], updated_forward_logits.cpu(), rtol=0, atol=atol)
        results.append(got)
    return results


def test_the_engine_samples_a_sharded_policy_on_its_gathered_weights(tiny_llama_dir, tmp_path):
    check_sharded_engine(tiny_llama_dir, tmp_path, RANKS, "cpu", 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_engine_captures_a_sharded_policy_on_one_gpu(tiny_llama_dir, tmp_path):
    """One GPU, FSDP2 over one rank (nccl): captured decode steps on gathered weights, captured again
    when a gather puts them elsewhere."""
    results = check_sharded_engine(tiny_llama_dir, tmp_path, 1, "cuda", 1e-4)
    assert results[0]["graphs"] > 0
