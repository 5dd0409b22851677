"""Fused projections: a layer's q/k/v (and gate/up) weights laid out as views into one buffer.

At decode, a batch of a few rows reads each weight once; three narrow GEMMs (q, k, v) or two wide
ones (gate, up) read the same bytes as one GEMM over the stacked weights, but cost more kernels and
run the narrow ones less efficiently. :func:`fuse` stacks the weights of frozen plain
``nn.Linear`` layers that read the same input into one buffer and makes each layer's weight a view
of its rows, so the model's own forward (HF's, the loss pass) reads exactly what it read before, and
the engine runs one GEMM and splits its output.

The buffer is built once (a copy per layer, then the old weights are freed) and checked before each
rollout (:meth:`FusedLinear.intact`): a ``load_state_dict`` writes through the views and keeps it;
anything that gives a layer a new weight tensor (``.to()``, a reload, a gather) makes the engine use
the layers one by one until it fuses them again. Not fused: LoRA layers (their adapters add to each
output apart), trainable weights, and weights a sharding strategy manages (ZeRO-3, FSDP2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FusedLinear:
    """``members``' weights (and biases) as row blocks of ``weight`` (``bias``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    members: tuple[nn.Linear, ...]
    sizes: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def intact(self) -> bool:
        """Whether every member's weight is still its view of the buffer."""
        offset = 0
        for member, rows in zip(self.members, self.sizes):
            if not _is_rows_of(member.weight, self.weight, offset, rows):
                return False
            if self.bias is not None and not _is_rows_of(member.bias, self.bias, offset, rows):
                return False
            offset += rows
        return True


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


@torch.no_grad()
def fuse(*linears: nn.Module) -> FusedLinear | None:
    """Stack the weights of ``linears`` (which must read the same input) into one buffer and make
    each weight a view of its rows; None when they cannot be fused (see the module docstring)."""
    if not _fusable(linears):
        return None
    sizes = tuple(linear.weight.shape[0] for linear in linears)
    weight = torch.cat([linear.weight for linear in linears])
    bias = torch.cat([linear.bias for linear in linears]) if linears[0].bias is not None else None
    offset = 0
    for linear, rows in zip(linears, sizes):
        linear.weight.data = weight.narrow(0, offset, rows)
        if bias is not None:
            linear.bias.data = bias.narrow(0, offset, rows)
        offset += rows
    return FusedLinear(weight, bias, tuple(linears), sizes)
