"""Sharded training: FSDP2 for every method, and the one switch that gathers sharded weights.

``--trainer.strategy fsdp`` (or ``fsdp2``) runs :class:`FSDP2Strategy`: PyTorch's ``fully_shard``
through Lightning's ``ModelParallelStrategy``, data-parallel over every rank. Lightning's own FSDP
strategy (FSDP1) wraps the whole LightningModule as one unit, so the loss's backward passes, which
run inside ``training_step``, meet a unit still in its forward and fail; FSDP2 shards module by
module and has no such unit.

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
on one GPU while it samples, and the rollout engine steps aside for FSDP's hooks (HF ``generate``
samples). The loss pass runs sharded, gathering layer by layer.

Checkpoints are one file with the trainable state gathered whole (``checkpointed_keys``), which any
strategy resumes from; :meth:`FSDP2Strategy.load_checkpoint` reads those of DDP and one device too.

DeepSpeed ZeRO-2 shards only optimizer state and gradients and needs none of this; its checkpoints
leave frozen weights out (:func:`register_strategies`). ZeRO-3 partitions every parameter and is
refused with one line (:func:`check_strategy`).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy, StrategyRegistry
from torch import nn

from modules.errors import UserError

FSDP_STRATEGY_NAMES = ("fsdp", "fsdp2")


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) data parallelism over every rank of every node; no tensor parallelism.

    Checkpoints are one file (``save_distributed_checkpoint=False``) holding only the trainable
    state, gathered to rank 0: a resume may use another number of GPUs or another strategy.
    """

    strategy_name = "fsdp2"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        # every process is one data-parallel rank (the parent class's "auto" means one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict:
        """The state the module checkpoints (``checkpointed_keys``), each tensor gathered whole: the
        frozen base is rebuilt from its id, so it is neither gathered nor written."""
        module = self.lightning_module
        keep = module.checkpointed_keys() if hasattr(module, "checkpointed_keys") else None
        state = {name: whole(t).detach().cpu() if isinstance(t, torch.Tensor) else t
                 for name, t in module.state_dict().items() if keep is None or name in keep}
        return state if self.global_rank == 0 else {}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """A one-file checkpoint of any strategy (this one's, DDP's, one device's) into the sharded
        module and optimizer. Lightning's own loading numbers the optimizer's tensors by their place
        among *all* the module's parameters, frozen ones included, and would give Adam's moments of
        a DDP checkpoint to the wrong tensors; here they go by their place in the optimizer, as in
        torch's own ``Optimizer.load_state_dict``."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = self.broadcast(checkpoint_path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        options = StateDictOptions(full_state_dict=True, strict=False)  # the frozen base is not in it
        set_model_state_dict(self.model, checkpoint["state_dict"], options=options)
        saved = checkpoint.pop("optimizer_states", [])
        if self.lightning_module.trainer.state.fn == "fit":
            for optimizer, state in zip(self.optimizers, saved):
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=_by_name(state, optimizer, self.model),
                                         options=options)
        checkpoint["state_dict"] = dict.fromkeys(checkpoint["state_dict"])  # names, for the module's check
        return checkpoint


def _by_name(saved: dict, optimizer, module: nn.Module) -> dict:
    """An optimizer state in torch's format (tensors numbered) keyed by parameter names instead:
    the k-th number of the saved groups is the k-th parameter of ``optimizer``'s groups."""
    numbers = [n for group in saved["param_groups"] for n in group["params"]]
    if numbers and isinstance(numbers[0], str):
        return saved  # already by name
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(numbers) != len(params):
        raise UserError(f"the checkpoint's optimizer holds {len(numbers)} tensors, this run trains {len(params)}: "
                        "was it written by this method with the same options?")
    names = {id(p): name for name, p in module.named_parameters()}
    name_of = {n: names[id(p)] for n, p in zip(numbers, params)}
    return {"state": {name_of[n]: value for n, value in saved["state"].items()},
            "param_groups": [{**group, "params": [name_of[n] for n in group["params"]]}
                             for group in saved["param_groups"]]}


class DeepSpeedTrainableStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, handing back the names of the tensors it loaded, for the
    module's check that a checkpoint holds everything that trains (DeepSpeed loads non-strictly)."""

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        if "state_dict" not in checkpoint:  # none found: the module's check names what is missing
            files = sorted(Path(checkpoint_path).glob("*/mp_rank_*_model_states.pt"))
            saved = torch.load(files[0], map_location="cpu", weights_only=False) if files else {}
            checkpoint["state_dict"] = dict.fromkeys(saved.get("module") or {})
        return checkpoint


def register_strategies() -> None:
    """Make ``fsdp`` and ``fsdp2`` name :class:`FSDP2Strategy` (see the module docstring for why
    ``fsdp`` is not Lightning's FSDP1 here), and the DeepSpeed names save no frozen weights: a
    checkpoint holds the trainable state, not a copy of the frozen base (which is rebuilt from its id)."""
    for name in FSDP_STRATEGY_NAMES:
        StrategyRegistry.register(name, FSDP2Strategy, description="FSDP2 (fully_shard) over every rank",
                                  override=True)
    for name, entry in list(StrategyRegistry.items()):
        if issubclass(entry["strategy"], DeepSpeedStrategy):
            StrategyRegistry.register(name, DeepSpeedTrainableStrategy, description=entry["description"],
                                      override=True, **{**entry["init_params"], "exclude_frozen_parameters": True})


def check_strategy(strategy) -> None:
    """One line for a strategy the methods cannot train under."""
    if getattr(strategy, "zero_stage_3", False):
        raise UserError("deepspeed_stage_3 is not supported: ZeRO-3 partitions every weight, and generation, the "
                        "shared judge and the LM head read weights outside a forward pass. Use "
                        "--trainer.strategy fsdp (the frozen base's layers sharded between rollouts) or "
                        "deepspeed_stage_2")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole on every rank (a collective); others as they are."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


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


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every FSDP2-sharded module of ``module`` whole for the context (gathered once, freed after);
    nothing to do when nothing is sharded."""
    with ExitStack() as stack:
        for part in fsdp_modules(module):
            stack.callback(_reshard, part)  # first: a failure while gathering still frees what was gathered
            part.set_reshard_after_forward(False, recurse=False)
            part.unshard()
        yield


def _reshard(part) -> None:
    part.set_reshard_after_forward(True, recurse=False)
    part.reshard()
