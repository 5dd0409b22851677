"""4-bit (bitsandbytes NF4/FP4) projections inside the engine's decode step.

A 4-bit weight is packed, so it cannot be a view of a stacked bf16 buffer as
:mod:`modules.engine.fusion` makes a plain weight. A :class:`QuantizedGroup` instead de-quantizes the
weights of its members (the linears that read one input: q/k/v, gate/up, or a lone o/down) into rows of
one scratch buffer that every layer's group of the same shape shares, runs one GEMM over it, and adds the
LoRA adapters as :class:`~modules.engine.fusion.FusedLinear` does (one GEMM for ``x A^T`` of every
adapter, one in-place ``addmm`` with the active adapters' ``s B^T``). Each decode step thus reads the
4-bit weights (a quarter of bf16's bytes), writes and reads their bf16 rows once; the scratch costs the
largest group's rows x hidden size in the compute dtype (gate/up of one layer: 2 x 14336 x 4096 bf16 =
235 MB at Llama-3-8B shape), whatever the number of layers.

The math is the layer's own: bitsandbytes' ``Linear4bit.forward`` also de-quantizes the weight and
runs one ``linear`` in the compute dtype, so the outputs are equal (tests/test_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modules.engine.fusion import AdapterRows


def is_4bit_linear(module: nn.Module) -> bool:
    """A frozen bitsandbytes 4-bit linear with its quantization state (packed weights)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency on Linux
        return False
    weight = getattr(module, "weight", None)
    return (isinstance(module, Linear4bit) and getattr(weight, "quant_state", None) is not None
            and not weight.requires_grad)


def _dequantize_into(linear: nn.Module, out: torch.Tensor) -> None:
    """``linear``'s weight, de-quantized into ``out`` (its rows of the scratch): straight there on a
    GPU; bitsandbytes' CPU backend has no ``out=`` kernel, so there through a copy."""
    from bitsandbytes.functional import dequantize_4bit

    if out.is_cuda:
        dequantize_4bit(linear.weight.data, linear.weight.quant_state, out=out)
    else:
        out.copy_(dequantize_4bit(linear.weight.data, linear.weight.quant_state))


@dataclass
class QuantizedGroup:
    """``members`` (4-bit linears reading one input) run as one GEMM over their de-quantized rows."""

    members: tuple[nn.Module, ...]
    sizes: tuple[int, ...]
    scratch: torch.Tensor
    """[>= O, d] shared by every group of this shape; rows [0, O) hold the members' weights during a call."""
    bias: torch.Tensor | None
    owners: tuple[nn.Module, ...] = ()
    adapters: tuple[AdapterRows, ...] = ()
    a_rows: torch.Tensor | None = None
    """[R, d]: every adapter's A, copied in by :meth:`refresh`."""
    b_t: torch.Tensor | None = None
    """[R, O]: ``scaling * B^T`` of each active adapter in its block, zeros elsewhere."""
    lora_active: bool = field(default=False)
    quant_ids: tuple[int, ...] = ()

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        width, offset = self.out_features, 0
        weight = self.scratch[:width]
        for member, rows in zip(self.members, self.sizes):
            _dequantize_into(member, weight[offset : offset + rows])
            offset += rows
        flat = F.linear(x.reshape(-1, x.shape[-1]), weight, self.bias)
        if self.lora_active:
            flat.addmm_(F.linear(x.reshape(-1, x.shape[-1]), self.a_rows), self.b_t)
        return flat.view(*x.shape[:-1], width).split(self.sizes, dim=-1)

    def intact(self) -> bool:
        """Whether the members hold the same quantized weights and the adapters are the same."""
        from modules.engine.fusion import _adapters_of, _base

        if tuple(_base(o) for o in self.owners) != self.members:
            return False
        if tuple(id(m.weight.quant_state) for m in self.members) != self.quant_ids:
            return False
        return _adapters_of(self.owners) == self.adapters

    @torch.no_grad()
    def refresh(self) -> bool:
        """Copy the adapters' current A, B and scaling, and which are active (before each rollout)."""
        if not self.adapters:
            self.lora_active = False
            return False
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.b_t.zero_()
        rank_offset, active = 0, False
        for rows in self.adapters:
            layer, name = rows.layer, rows.adapter
            self.a_rows[rank_offset : rank_offset + rows.rank].copy_(layer.lora_A[name].weight)
            if not layer.disable_adapters and not layer.merged and name in layer.active_adapters:
                out = slice(starts[rows.member], starts[rows.member] + self.sizes[rows.member])
                self.b_t[rank_offset : rank_offset + rows.rank, out].copy_(
                    layer.lora_B[name].weight.t() * layer.scaling[name])
                active = True
            rank_offset += rows.rank
        self.lora_active = active
        return active


class ScratchPool:
    """One scratch buffer per (input size, dtype, device), grown to the widest group that uses it."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (columns, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < rows:
            buffer = torch.empty(rows, columns, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer


@torch.no_grad()
def fuse_quantized(modules: tuple[nn.Module, ...], pool: ScratchPool) -> QuantizedGroup | None:
    """A :class:`QuantizedGroup` for ``modules`` (4-bit linears or LoRA layers over them), or None."""
    from modules.engine.fusion import _adapters_of, _base, _lora_fusable

    linears = tuple(_base(m) for m in modules)
    if not all(is_4bit_linear(m) for m in linears) or not _lora_fusable(modules):
        return None
    columns = linears[0].in_features
    dtype = linears[0].compute_dtype or torch.float32
    if any(m.in_features != columns or (m.compute_dtype or torch.float32) != dtype or (m.bias is None)
           != (linears[0].bias is None) for m in linears):
        return None
    device = linears[0].weight.device
    sizes = tuple(m.out_features for m in linears)
    adapters = _adapters_of(modules)
    ranks = sum(a.rank for a in adapters)
    bias = torch.cat([m.bias.to(dtype) for m in linears]) if linears[0].bias is not None else None
    group = QuantizedGroup(linears, sizes, pool.get(sum(sizes), columns, dtype, device), bias, tuple(modules),
                           adapters,
                           torch.zeros(ranks, columns, dtype=dtype, device=device) if adapters else None,
                           torch.zeros(ranks, sum(sizes), dtype=dtype, device=device) if adapters else None,
                           quant_ids=tuple(id(m.weight.quant_state) for m in linears))
    group.refresh()
    return group
