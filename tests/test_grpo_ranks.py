"""GRPO's normalisers over two ranks (two CPU processes, gloo on 127.0.0.1): under DDP the gradient of
every optimizer step equals that of one process on the concatenated batch, for every ``loss_type``,
with the counts of :func:`modules.rl.grpo.update_totals` summed over ranks as ``OracleGRPO.update``
does; the old per-rank, per-step ``dapo`` normaliser does not give it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from modules.rl import grpo
from tests.helpers import free_port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

RANKS, ROWS, WIDTH, VOCAB, FEATURES, STEPS, CHUNK = 2, 4, 6, 5, 3, 2, 1
"""Per rank: 4 rows of at most 6 tokens, in 2 optimizer steps (minibatches) of 2 chunks of 1 row."""
LENGTHS = [[6, 5, 6, 5], [3, 1, 2, 4]]  # rank 0 has long replies, rank 1 short ones
VALID = [[True, True, True, True], [True, True, False, True]]  # one invalid reply on rank 1
# valid tokens per step: 11 and 11 on rank 0, 4 and 4 on rank 1 (30 in the rollout batch)
BETA, EPS_LOW, EPS_HIGH = 0.1, 0.2, 0.28


def rollout_rows(rank: int) -> dict[str, torch.Tensor]:
    """One rank's share of the rollout batch: the same tensors in every process (seeded)."""
    generator = torch.Generator().manual_seed(1234)
    n = RANKS * ROWS
    data = {"x": torch.randn(n, WIDTH, FEATURES, generator=generator, dtype=torch.float64),
            "tokens": torch.randint(0, VOCAB, (n, WIDTH), generator=generator),
            "old": -torch.rand(n, WIDTH, generator=generator, dtype=torch.float64) - 1.0,
            "ref": -torch.rand(n, WIDTH, generator=generator, dtype=torch.float64) - 1.0,
            "advantages": torch.randn(n, generator=generator, dtype=torch.float64)}
    lengths = torch.tensor(sum(LENGTHS, []))
    data["mask"] = (torch.arange(WIDTH)[None, :] < lengths[:, None]).to(torch.float64)
    data["valid"] = torch.tensor(sum(VALID, []))
    return {k: v[rank * ROWS : (rank + 1) * ROWS] for k, v in data.items()}


def select(data: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in data.items()}


def concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def policy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, VOCAB).double()


def chunk_loss(model: nn.Module, chunk: dict[str, torch.Tensor], aggregate, totals: grpo.UpdateTotals) -> torch.Tensor:
    logp = torch.log_softmax(model(chunk["x"]), -1).gather(-1, chunk["tokens"][..., None]).squeeze(-1)
    terms = grpo.grpo_token_loss(logp, chunk["old"], chunk["ref"], chunk["advantages"], chunk["mask"],
                                 chunk["valid"], EPS_LOW, EPS_HIGH, BETA)
    return aggregate(terms.loss, terms.weight, totals)


def step_gradients(model: nn.Module, steps: list[list[dict[str, torch.Tensor]]], whole: dict[str, torch.Tensor],
                   loss_type: str, reduce, per_step_dapo: bool = False) -> list[torch.Tensor]:
    """The gradient of each optimizer step (no parameter update between them), as ``OracleGRPO.update``
    computes it; ``per_step_dapo`` uses a per-step normaliser (this rank's step tokens)."""
    aggregate = grpo.loss_aggregation(loss_type)
    generation = grpo.update_totals([whole["mask"]], [whole["valid"]], WIDTH, reduce)
    out = []
    for chunks in steps:
        masks, valids = [c["mask"] for c in chunks], [c["valid"] for c in chunks]
        totals = (grpo.update_totals(masks, valids, WIDTH) if per_step_dapo
                  else grpo.update_totals(masks, valids, WIDTH, reduce, generation.generation_tokens))
        model.zero_grad(set_to_none=True)
        for chunk in chunks:
            chunk_loss(model, chunk, aggregate, totals).backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
    return out


def rank_steps(data: dict[str, torch.Tensor]) -> list[list[dict[str, torch.Tensor]]]:
    size = ROWS // STEPS
    return [[select(data, slice(s + c, s + c + CHUNK)) for c in range(0, size, CHUNK)]
            for s in range(0, ROWS, size)]


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        model = nn.parallel.DistributedDataParallel(policy())
        data = rollout_rows(rank)
        results = {name: step_gradients(model, rank_steps(data), data, name, _sum_over_ranks)
                   for name in grpo.LOSS_AGGREGATIONS}
        results["dapo_per_step"] = step_gradients(model, rank_steps(data), data, "dapo", _sum_over_ranks,
                                                  per_step_dapo=True)
        torch.save(results, Path(folder) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[torch.Tensor]]:
    folder = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_worker, args=(free_port(), str(folder)), nprocs=RANKS, join=True, start_method="spawn")
    results = [torch.load(folder / f"rank{r}.pt") for r in range(RANKS)]
    for name in results[0]:  # DDP leaves the same averaged gradient on every rank
        for a, b in zip(results[0][name], results[1][name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    return results[0]


def one_process(loss_type: str) -> list[torch.Tensor]:
    """One process, no reduction: step s is the concatenation of every rank's step s."""
    shares = [rollout_rows(r) for r in range(RANKS)]
    per_rank = [rank_steps(d) for d in shares]
    steps = [sum((steps[s] for steps in per_rank), []) for s in range(STEPS)]
    return step_gradients(policy(), steps, concat(shares), loss_type, grpo.no_reduce)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("loss_type", list(grpo.LOSS_AGGREGATIONS))
def test_two_ranks_give_the_gradient_of_one_process_on_the_whole_batch(two_ranks, loss_type):
    for ddp, single in zip(two_ranks[loss_type], one_process(loss_type)):
        assert single.norm() > 0
        torch.testing.assert_close(ddp, single, rtol=1e-12, atol=1e-12)


def test_the_per_rank_per_step_dapo_normaliser_is_not_that_gradient(two_ranks):
    """A per-rank, per-step normaliser (this rank's valid tokens of this step) weighs rank 1's short
    replies more than rank 0's long ones and each step as a whole batch."""
    single = one_process("dapo")
    differences = [relative(old, new) for old, new in zip(two_ranks["dapo_per_step"], single)]
    print("relative gradient difference, per-rank per-step dapo vs one process:", differences)
    assert min(differences) > 0.3
