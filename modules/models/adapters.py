"""A LoRA policy on a frozen base model, with switches for the reference policy and the bare base.

    lora = LoRAPolicy(base_model, adapter_path=None, r=16, alpha=32, target_modules="all-linear")
    lora.model                  # the peft model; forward/generate use the trainable adapter
    with lora.reference():      # the policy as training started
        ...
    with lora.base():           # every adapter off: the base model (e.g. a judge sharing the weights)
        ...

The trainable adapter is peft's ``default`` adapter, so ``save_pretrained`` writes PEFT's own
layout and ``PeftModel.from_pretrained(base, folder)`` loads it in plain transformers + peft.

The reference is never a second copy of the base model:

- a fresh adapter starts as the identity (LoRA's B matrix is zero), so the reference is the base
  model: every adapter off;
- an adapter loaded from a path (e.g. an SFT adapter) is loaded a second time as a frozen
  adapter named ``reference`` on the same base, and the reference switch makes it the active one.

The switches set the layers' active adapter directly; peft's own ``set_adapter`` and
``disable_adapter`` also flip ``requires_grad``, which would make the frozen copy trainable.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from modules.errors import UserError
from modules.files import partial_path
from modules.models.hub import resolve_adapter_folder

POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def parse_target_modules(target_modules: str | list[str]) -> str | list[str]:
    """``all-linear`` (peft's shorthand), a comma-separated string, or a list of module names."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return [t.strip() for t in target_modules.split(",") if t.strip()]
    return target_modules


class LoRAPolicy:
    """Wraps ``base_model`` with a trainable LoRA adapter (fresh or loaded) and a reference switch.

    Args:
        base_model: A frozen causal LM (its parameters stay frozen).
        adapter_path: Start from this PEFT adapter folder or Hub id (trainable), else a fresh adapter.
        r, alpha, dropout, target_modules: LoRA options of a fresh adapter (ignored when loading).
        keep_reference: Load the starting adapter a second time, frozen, for ``reference()``.
    """

    def __init__(self, base_model: nn.Module, adapter_path: str | None = None, r: int = 16, alpha: float = 32,
                 dropout: float = 0.0, target_modules: str | list[str] = "all-linear", keep_reference: bool = True):
        from peft import LoraConfig, PeftModel, get_peft_model

        self.adapter_path = adapter_path
        if adapter_path:
            folder = resolve_adapter_folder(adapter_path)  # a path, or a Hub id fetched to the HF cache
            if not (folder / "adapter_config.json").is_file():
                raise UserError(f"adapter path '{adapter_path}' holds no adapter_config.json: "
                                "point at a folder written by peft's save_pretrained")
            try:
                model = PeftModel.from_pretrained(base_model, str(folder), adapter_name=POLICY_ADAPTER,
                                                  is_trainable=True)
                if keep_reference:
                    model.load_adapter(str(folder), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            except (ValueError, KeyError, RuntimeError) as err:
                raise UserError(f"could not load adapter '{adapter_path}' onto the base model: "
                                f"{str(err).splitlines()[0]}") from None
        else:
            if r < 1:
                raise UserError(f"lora_r must be at least 1, got {r}")
            if not 0.0 <= dropout < 1.0:
                raise UserError(f"lora_dropout must be in [0, 1), got {dropout}")
            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                                target_modules=parse_target_modules(target_modules))
            try:
                model = get_peft_model(base_model, config, adapter_name=POLICY_ADAPTER)
            except ValueError as err:
                raise UserError(f"lora_target_modules {target_modules!r}: {str(err).splitlines()[0]}") from None
        self.model = model
        self.has_reference_copy = bool(adapter_path) and keep_reference
        for name, param in model.named_parameters():  # only the policy adapter trains
            param.requires_grad_(f".{POLICY_ADAPTER}." in name and "lora_" in name)
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError("the LoRA adapter has no trainable parameters: check lora_target_modules")

    # -- switches --------------------------------------------------------------------------------
    @contextmanager
    def _active(self, adapter: str | None) -> Iterator[None]:
        layers = _tuner_layers(self.model)
        saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
        try:
            for layer in layers:
                if adapter is None:
                    layer._disable_adapters = True
                else:
                    layer._active_adapter = [adapter]
                    layer._disable_adapters = False
            yield
        finally:
            for layer, (active, disabled) in zip(layers, saved):
                layer._active_adapter, layer._disable_adapters = active, disabled

    def reference(self):
        """The policy as training started: the frozen copy of the starting adapter, or the base."""
        return self._active(REFERENCE_ADAPTER if self.has_reference_copy else None)

    def base(self):
        """Every adapter off: the base model."""
        return self._active(None)

    # -- saving ----------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """The trainable adapter in PEFT's own format (``adapter_config.json`` + safetensors), plus
        ``extra`` files (name -> tensors, ``torch.save``d), written atomically: into a hidden
        temporary folder that replaces ``folder`` when complete."""
        folder = Path(folder)
        partial = partial_path(folder)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        # the adapter's tensors as the modules hold them now (whole inside ``gathered``: a state_dict()
        # call on FSDP2-sharded layers would hand back shards)
        adapter = {n: p.detach() for n, p in self.model.named_parameters() if "lora_" in n}
        self.model.save_pretrained(str(partial), selected_adapters=[POLICY_ADAPTER], state_dict=adapter)
        for name, tensors in (extra or {}).items():
            torch.save({k: v.detach().cpu() for k, v in tensors.items()}, partial / name)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        return folder

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
