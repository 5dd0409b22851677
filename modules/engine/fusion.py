"""Fused projections: the linears that read one input, and their LoRA adapters, as one GEMM.

At decode, a batch of a few rows reads each weight once; three narrow GEMMs (q, k, v) or two wide
ones (gate, up) read the same bytes as one GEMM over the stacked weights, but cost more kernels and
run the narrow ones less efficiently. :func:`fuse` stacks the weights of frozen plain
``nn.Linear`` layers that read the same input into one buffer and makes each layer's weight a view
of its rows, so the model's own forward (HF's, the loss pass) reads exactly what it read before, and
the engine runs one GEMM and splits its output.

LoRA layers (peft, unmerged) are fused through their frozen ``base_layer``; below the base rows the
buffer holds the A matrix of every adapter of the group's LoRA layers (the trainable policy and a
frozen reference alike), so the same GEMM also yields ``x A^T`` for all of them. One more GEMM,
accumulated in place into the base output, adds ``(x A^T) (s B)^T`` for the *active* adapters:
``b_t`` holds each active adapter's ``s B^T`` in its (rank rows, output columns) block and zeros
elsewhere. A decode step of a LoRA group is thus two GEMMs where peft runs one per projection plus
two per adapter, with casts between. :meth:`FusedLinear.refresh` copies the adapters' current
values (and the active set) into the buffer before each rollout: the optimizer keeps updating
peft's own parameters, never the copies, and captured graphs read the copies in place. The LoRA
arithmetic runs in the base weights' dtype (bf16 on a GPU), where peft runs it in the adapter's
(fp32): the logits differ by bf16 rounding, as the rest of a bf16 step does.

The buffer is built once (a copy per layer, then the old weights are freed) and checked before each
rollout (:meth:`FusedLinear.intact`): a ``load_state_dict`` writes through the views and keeps it;
anything that gives a layer a new weight tensor (``.to()``, a reload, a gather) or another set of
adapters makes the engine use the layers one by one until it fuses them again. Not fused: trainable
base weights, weights a sharding strategy manages (ZeRO-3, FSDP2), LoRA layers with a bias on B.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


@dataclass(frozen=True)
class AdapterRows:
    """One adapter of one LoRA layer of a group: where its A rows and B block go."""

    member: int
    """Index of the group member whose output it adds to."""
    layer: nn.Module
    """The peft LoRA layer."""
    adapter: str
    rank: int


@dataclass
class FusedLinear:
    """``members``' weights (and biases) as row blocks of ``weight`` (``bias``), then the A rows of
    every adapter in ``adapters``."""

    weight: torch.Tensor
    """[O + R, d]: the members' weights (O rows), then each adapter's A (R rows in all)."""
    bias: torch.Tensor | None
    """[O + R]: the members' biases, then zeros (None: no bias)."""
    members: tuple[nn.Linear, ...]
    """The plain linears whose weights are views of the buffer (a LoRA layer's ``base_layer``)."""
    sizes: tuple[int, ...]
    owners: tuple[nn.Module, ...] = ()
    """The modules the model calls (a LoRA layer, or the member itself)."""
    adapters: tuple[AdapterRows, ...] = ()
    b_t: torch.Tensor | None = None
    """[R, O]: ``scaling * B^T`` of each active adapter in its block, zeros elsewhere."""
    lora_active: bool = field(default=False)
    """Whether any adapter of the group acts in the forward (set by :meth:`refresh`)."""

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.adapters:
            return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        width = self.out_features
        flat = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)  # [N, O + R]: outputs and x A^T
        out = flat[:, :width]
        if self.lora_active:
            out.addmm_(flat[:, width:], self.b_t)  # in place: a strided view is a matrix with a leading dim
        return out.view(*x.shape[:-1], width).split(self.sizes, dim=-1)

    def intact(self) -> bool:
        """Whether every member's weight is still its view of the buffer, and the adapters are the same."""
        offset = 0
        for member, rows in zip(self.members, self.sizes):
            if not _is_rows_of(member.weight, self.weight, offset, rows):
                return False
            if self.bias is not None and not _is_rows_of(member.bias, self.bias, offset, rows):
                return False
            offset += rows
        if self.owners and tuple(_base(o) for o in self.owners) != self.members:
            return False
        return _adapters_of(self.owners) == self.adapters if self.owners else True

    @torch.no_grad()
    def refresh(self) -> bool:
        """Copy the adapters' current A, B and scaling, and which of them are active, into the buffers
        (before each rollout; the addresses stay, so captured graphs read the new values)."""
        if not self.adapters:
            self.lora_active = False
            return False
        width, rank_offset, active = self.out_features, 0, False
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.b_t.zero_()
        for rows in self.adapters:
            layer, name = rows.layer, rows.adapter
            block = slice(width + rank_offset, width + rank_offset + rows.rank)
            self.weight[block].copy_(layer.lora_A[name].weight)
            if not layer.disable_adapters and not layer.merged and name in layer.active_adapters:
                b = layer.lora_B[name].weight  # [out, rank]
                out = slice(starts[rows.member], starts[rows.member] + self.sizes[rows.member])
                self.b_t[rank_offset : rank_offset + rows.rank, out].copy_(b.t() * layer.scaling[name])
                active = True
            rank_offset += rows.rank
        self.lora_active = active
        return active


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if _is_lora(module) else module


def _adapters_of(owners: tuple[nn.Module, ...]) -> tuple[AdapterRows, ...]:
    rows = []
    for index, owner in enumerate(owners):
        if _is_lora(owner):
            for name in sorted(owner.lora_A.keys()):
                rows.append(AdapterRows(index, owner, name, int(owner.lora_A[name].weight.shape[0])))
    return tuple(rows)


def _is_rows_of(tensor: torch.Tensor | None, buffer: torch.Tensor, offset: int, rows: int) -> bool:
    if tensor is None:
        return False
    expected = buffer.narrow(0, offset, rows)
    return (tensor.data_ptr() == expected.data_ptr() and tensor.shape == expected.shape
            and tensor.stride() == expected.stride() and tensor.dtype == buffer.dtype)


def _fusable(linears: tuple[nn.Module, ...]) -> bool:
    first = linears[0]
    for linear in linears:
        if type(linear) is not nn.Linear or linear.weight.requires_grad:
            return False
        weight = linear.weight
        if (type(weight) is not nn.Parameter or hasattr(weight, "ds_id") or not weight.is_contiguous()
                or weight.dtype != first.weight.dtype or weight.device != first.weight.device
                or weight.shape[1] != first.weight.shape[1] or (linear.bias is None) != (first.bias is None)):
            return False
        if linear.bias is not None and (linear.bias.requires_grad or type(linear.bias) is not nn.Parameter):
            return False
    return len({id(linear.weight) for linear in linears}) == len(linears)


def _lora_fusable(owners: tuple[nn.Module, ...]) -> bool:
    for owner in owners:
        if _is_lora(owner):
            if getattr(owner, "lora_variant", None) or getattr(owner, "merged", False):
                return False
            if any(b.bias is not None for b in owner.lora_B.values()):
                return False
            if any(hasattr(a.weight, "ds_id") for a in owner.lora_A.values()):
                return False
    return True


@torch.no_grad()
def fuse(*modules: nn.Module) -> FusedLinear | None:
    """Stack the weights of ``modules`` (plain or LoRA linears, which must read the same input) into one
    buffer, each weight a view of its rows, the adapters' A rows below; None when they cannot be fused
    (see the module docstring). A single plain linear is not worth fusing: None."""
    linears = tuple(_base(m) for m in modules)
    adapters = _adapters_of(modules)
    if (len(modules) == 1 and not adapters) or not _fusable(linears) or not _lora_fusable(modules):
        return None
    sizes = tuple(linear.weight.shape[0] for linear in linears)
    width, ranks, first = sum(sizes), sum(a.rank for a in adapters), linears[0].weight
    weight = torch.zeros(width + ranks, first.shape[1], dtype=first.dtype, device=first.device)
    torch.cat([linear.weight for linear in linears], out=weight[:width])
    bias = None
    if linears[0].bias is not None:
        bias = torch.zeros(width + ranks, dtype=linears[0].bias.dtype, device=first.device)
        torch.cat([linear.bias for linear in linears], out=bias[:width])
    offset = 0
    for linear, rows in zip(linears, sizes):
        linear.weight.data = weight.narrow(0, offset, rows)
        if bias is not None:
            linear.bias.data = bias.narrow(0, offset, rows)
        offset += rows
    b_t = torch.zeros(ranks, width, dtype=first.dtype, device=first.device) if adapters else None
    fused = FusedLinear(weight, bias, linears, sizes, tuple(modules), adapters, b_t)
    fused.refresh()
    return fused
