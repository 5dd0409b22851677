"""Sharded tensors under FSDP2 and DeepSpeed ZeRO-3, and the one switch that gathers sharded weights.

The strategies themselves (``--trainer.strategy fsdp`` / ``fsdp2`` / ``deepspeed_stage_*``) are
defined in :mod:`modules.strategies`; this module holds what a method's update calls under any of
them.

What is sharded (:func:`shard_for_fsdp2`, from ``OnPolicyModule.configure_model``):

- every decoder layer of the policy (the frozen base's weights and any LoRA weights inside them):
  each rank keeps 1/N of them between forward passes;
- every module outside those layers that owns a trainable parameter (the steering vector, a value
  head), so that every trainable tensor is a shard of one mesh, and clipping, the optimizer and the
  checkpoint treat them alike. Such a module is used through its ``forward`` (the steering hook
  calls ``SteeringVector()``), which is when FSDP2 gathers it.

Frozen parts outside the layers (embeddings, final norm, LM head, a SARM reward model, a judge of its
own) stay whole on every rank: they hold no optimizer state, and the loss reads the LM head's weight
directly.

Generation, the judge and the exports need whole weights: :func:`gathered` gathers every sharded
module once (not layer by layer at every decoded token), keeps it whole for the context, and frees
the copies after. The loop wraps collect + score, held-out reports and exports in it: no collective
runs while a rank samples (ranks stop sampling at different steps), but the whole policy must fit
on one GPU while it samples; the rollout engine runs on the gathered weights, its layers unfused
(:mod:`modules.engine.support`). The loss pass runs sharded, gathering layer by layer.

ZeRO-3 partitions every parameter of the module, frozen ones included, and gathers a layer's weights
in forward hooks. For generation, the judge and the exports :func:`gathered` takes DeepSpeed's hooks
off, gathers every parameter once, and puts the hooks back after (so no rank waits in a collective
while another samples); the loss reads the LM head's weight through :func:`whole`. Under every
DeepSpeed stage DeepSpeed clips the gradients and skips a step whose gradient norm is NaN/inf
(:func:`deepspeed_engine`).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn


def deepspeed_engine(strategy):
    """The DeepSpeed engine when ``strategy`` is DeepSpeed and set up, else None. DeepSpeed keeps
    the gradients in its own partitions (``p.grad`` stays None), clips them and skips a step whose
    gradient norm is NaN/inf itself; its ``get_global_grad_norm()`` after a step is the norm before
    clipping."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    engine = strategy.model
    return engine if hasattr(engine, "get_global_grad_norm") else None


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every rank (a collective: every rank calls it for the same
    tensors): an FSDP2 DTensor as its full tensor, a ZeRO-3 partitioned parameter as a detached copy;
    others as they are."""
    full = getattr(tensor, "full_tensor", None)
    if full is not None:
        return full()
    if _zero3_partitioned(tensor):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    return tensor


def _zero3_partitioned(tensor: torch.Tensor) -> bool:
    status = getattr(tensor, "ds_status", None)
    return status is not None and status.name == "NOT_AVAILABLE"


def rows_of_every_rank(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` [N, ...] of every rank stacked in rank order (the same on every rank; each rank must
    pass the same shape); ``rows`` itself on one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = rows.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(rows.device)


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, whole or sharded (the same value on every rank)."""
    if not tensors:
        return torch.zeros(())
    tensors = [whole(t) if _zero3_partitioned(t) else t for t in tensors]
    return whole(torch.nn.utils.get_total_norm(tensors))


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def shard_for_fsdp2(module: nn.Module, policy: nn.Module, mesh) -> int:
    """``fully_shard`` the policy's decoder layers and every other module that owns a trainable
    parameter; returns how many modules were sharded."""
    from torch.distributed.fsdp import fully_shard

    from modules.models.steering import decoder_layers

    if fsdp_modules(module):
        return 0  # already sharded (configure_model runs again on a second fit)
    layers = list(decoder_layers(policy))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    owners: dict[int, nn.Module] = {}
    for sub in module.modules():
        if any(p.requires_grad and id(p) not in inside for p in sub.parameters(recurse=False)):
            owners[id(sub)] = sub
    for owner in owners.values():
        fully_shard(owner, mesh=mesh)
    return len(layers) + len(owners)


def zero3_coordinator(module: nn.Module):
    """DeepSpeed's ZeRO-3 parameter coordinator (its forward hooks gather a layer's weights) of the
    run training ``module``, or None under any other strategy."""
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if not getattr(strategy, "zero_stage_3", False):
        return None
    return getattr(getattr(strategy.model, "optimizer", None), "parameter_offload", None)


@contextmanager
def _zero3_whole(coordinator) -> Iterator[None]:
    """Every ZeRO-3 partitioned parameter gathered once, with DeepSpeed's per-layer hooks off (they
    would free each layer after its forward and gather it again at the next token, a collective per
    layer per token that ranks sampling different lengths would not all reach); hooks back after."""
    import deepspeed

    params = list(coordinator.module.parameters())
    for hook in coordinator.forward_hooks + coordinator.backward_hooks:
        hook.remove()
    coordinator.forward_hooks, coordinator.backward_hooks = [], []
    for param in params:
        param.ds_active_sub_modules.clear()
    try:
        with deepspeed.zero.GatheredParameters(params):
            yield
    finally:
        coordinator._register_deepspeed_module(coordinator.module)  # the hooks, as DeepSpeed set them up


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every sharded weight of ``module`` whole for the context (FSDP2 modules and ZeRO-3 parameters
    gathered once, freed after); nothing to do when nothing is sharded."""
    with ExitStack() as stack:
        coordinator = zero3_coordinator(module)
        if coordinator is not None:
            stack.enter_context(_zero3_whole(coordinator))
        for part in fsdp_modules(module):
            stack.callback(_reshard, part)  # first: a failure while gathering still frees what was gathered
            part.set_reshard_after_forward(False, recurse=False)
            part.unshard()
        yield


def _reshard(part) -> None:
    part.set_reshard_after_forward(True, recurse=False)
    part.reshard()
