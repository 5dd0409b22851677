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
on one GPU while it samples; the rollout engine runs on the gathered weights, its layers unfused
(:mod:`modules.engine.support`). The loss pass runs sharded, gathering layer by layer.

Checkpoints are one file with the trainable state gathered whole (``checkpointed_keys``), which any
strategy resumes from; :meth:`FSDP2Strategy.load_checkpoint` reads those of DDP and one device too.

DeepSpeed (:class:`DeepSpeedTrainableStrategy`): ZeRO-2 shards only optimizer state and gradients
and needs none of this. ZeRO-3 partitions every parameter of the module, frozen ones included, and
gathers a layer's weights in forward hooks. For generation, the judge and the exports
:func:`gathered` takes DeepSpeed's hooks off, gathers every parameter once, and puts the hooks back
after (so no rank waits in a collective while another samples); the loss reads the LM head's
weight through :func:`whole`. A 4-bit (bitsandbytes) base can be sharded by neither ZeRO-3 nor
FSDP2 and is refused with one line (:func:`check_strategy`). Under every DeepSpeed stage the
checkpoints leave frozen weights out, DeepSpeed clips the gradients (``gradient_clipping`` = the
method's ``max_grad_norm``) and skips a step whose gradient norm is NaN/inf (:func:`deepspeed_engine`).
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
    """Lightning's DeepSpeed strategy for the on-policy methods:

    - clips gradients at the module's ``max_grad_norm`` (Lightning's ``clip_gradients`` does nothing
      under DeepSpeed, and its config takes the Trainer's ``gradient_clip_val``, which manual
      optimization cannot set);
    - lets the gradients of several backward passes in one ``training_step`` add up, under every
      stage. A method's update is N backward passes (N = chunks of ``update_batch_size``) and then
      one ``step()``, all inside one forward of DeepSpeed's engine. DeepSpeed's default ("managed")
      accumulation decides from its own micro-step counter which backward ends a step; with
      ``gradient_accumulation_steps`` 1 it takes every backward for the last one, and under
      ZeRO-2 with an offloaded optimizer the fp32 gradient then holds only the last pass plus a
      CPU buffer left from earlier steps (a resume, which starts with a fresh buffer, came out
      6.5e-4 off). So the config sets ``managed_gradient_accumulation: false``: ``step()`` is the
      boundary and every backward adds. And ZeRO-3 counts a micro-step (while it is 0 a gradient
      is copied into its partition, not added) at each forward of the engine, so one is opened
      before each backward, as the engine's forward would;
    - hands back the names of the tensors a checkpoint held, for the module's check that it holds
      everything that trains (DeepSpeed loads non-strictly).
    """

    def setup(self, trainer) -> None:
        from deepspeed.runtime.engine import DeepSpeedEngine

        if not hasattr(DeepSpeedEngine, "managed_gradient_accumulation"):
            import deepspeed

            raise UserError(f"DeepSpeed {deepspeed.__version__} cannot leave the end of an update to the caller "
                            "(managed_gradient_accumulation, in 0.19.8), which the methods' several backward "
                            "passes per update need: pip install 'deepspeed>=0.19.8'")
        if self.config is not None:
            self.config.setdefault("managed_gradient_accumulation", False)  # step() ends an update: see above
            self.config.setdefault("gradient_clipping", float(getattr(trainer.lightning_module, "max_grad_norm", 0.0)))
            # offloaded, the optimizer state lives in CPU memory; torch's AdamW steps it there. DeepSpeed
            # insists on its own compiled CPU Adam unless told otherwise, which pays off for full
            # fine-tuning, not for a vector, LoRA or a value head
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)
        super().setup(trainer)

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        zero_optimizer = getattr(self.deepspeed_engine, "optimizer", None)
        if hasattr(zero_optimizer, "clear_backward_seen_flag"):
            zero_optimizer.clear_backward_seen_flag()  # what the engine's forward does before each backward
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        if "state_dict" not in checkpoint:  # none found: the module's check names what is missing
            # ZeRO-2 writes mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_K_mp_rank_00_model_states.pt per rank
            files = sorted(Path(checkpoint_path).glob("*/*mp_rank_*_model_states.pt"))
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


def check_strategy(strategy, module: nn.Module) -> None:
    """One line for a combination the methods cannot train under: a 4-bit (bitsandbytes) base packs
    its weights into uint8 tensors, which neither ZeRO-3 nor FSDP2 can shard."""
    sharded = "deepspeed_stage_3" if getattr(strategy, "zero_stage_3", False) else (
        "fsdp" if isinstance(strategy, FSDP2Strategy) else None)
    if sharded and any(type(p).__name__ == "Params4bit" for p in module.parameters()):
        raise UserError(f"{sharded} cannot shard a 4-bit (bitsandbytes) base: use --trainer.strategy ddp or "
                        f"deepspeed_stage_2 with load_in_4bit, or {sharded} with a bf16 base")


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
