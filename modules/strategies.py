"""The training strategies by name: FSDP2 for every method, and DeepSpeed with trainable-only checkpoints.

``--trainer.strategy fsdp`` (or ``fsdp2``) runs :class:`FSDP2Strategy`: PyTorch's ``fully_shard``
through Lightning's ``ModelParallelStrategy``, data-parallel over every rank. Lightning's own FSDP
strategy (FSDP1) wraps the whole LightningModule as one unit, so the loss's backward passes, which
run inside ``training_step``, meet a unit still in its forward and fail; FSDP2 shards module by
module and has no such unit. What it shards, and how rollouts read whole weights:
:mod:`modules.sharding`.

Checkpoints are one file with the trainable state gathered whole (``checkpointed_keys``), which any
strategy resumes from; :meth:`FSDP2Strategy.load_checkpoint` reads those of DDP and one device too.

DeepSpeed (:class:`DeepSpeedTrainableStrategy`): ZeRO-2 shards only optimizer state and gradients;
ZeRO-3 partitions every parameter (:mod:`modules.sharding` gathers them for rollouts). A 4-bit
(bitsandbytes) base can be sharded by neither ZeRO-3 nor FSDP2 and is refused with one line
(:func:`check_strategy`). Under every DeepSpeed stage the checkpoints leave frozen weights out and
DeepSpeed clips the gradients (``gradient_clipping`` = the method's ``max_grad_norm``).

:func:`register_strategies` (called by ``cli.py``) puts these under Lightning's strategy names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy, StrategyRegistry
from torch import nn

from modules.errors import UserError
from modules.sharding import whole

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
