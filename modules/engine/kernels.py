"""The small element-wise pieces of a decoder step, written as HF writes them (same casts, same
order), so that the engine's logits equal a plain forward's.

On CUDA the decode step uses :func:`fused_ops`: the same functions through ``torch.compile`` (each
becomes one or two fused kernels instead of five to ten), called inside the captured CUDA graph.
Prefill and CPU use them as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama/Qwen RMSNorm: in fp32, cast back, then times the weight."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual sum ``x + y`` and its RMSNorm (one fused kernel when compiled)."""
    h = x + y
    return h, rms_norm(h, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_norm_w: torch.Tensor | None,
            k_norm_w: torch.Tensor | None, eps: float, num_heads: int, num_kv_heads: int, head_dim: int):
    """[B, T, H*D] projections to rotated [B, H, T, D] queries and [B, Hkv, T, D] keys (Qwen3's
    per-head RMSNorm first when its weights are given)."""
    batch, length = q.shape[:2]
    q = q.view(batch, length, num_heads, head_dim)
    k = k.view(batch, length, num_kv_heads, head_dim)
    if q_norm_w is not None:
        q, k = rms_norm(q, q_norm_w, eps), rms_norm(k, k_norm_w, eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None, eps: float, num_heads: int,
            num_kv_heads: int, head_dim: int):
    """:func:`qk_rope`, and the new keys and values stacked [2, B, Hkv, T, D] (one cache write)."""
    q, k = qk_rope(q, k, cos, sin, q_norm_w, k_norm_w, eps, num_heads, num_kv_heads, head_dim)
    v = v.view(v.shape[0], v.shape[1], num_kv_heads, head_dim).transpose(1, 2)
    return q, torch.stack((k, v))


def attention_probs(scores: torch.Tensor, mask: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Attention weights from raw ``q @ k^T`` scores: scaled, the additive mask added, softmax in
    fp32 (as HF's attention does), cast to ``dtype`` for the product with the values."""
    return (scores.float() * scale + mask).softmax(-1).to(dtype)


@lru_cache(maxsize=1)
def _bmm_out_dtype_works() -> bool:
    try:
        a = torch.zeros(1, 1, 8, dtype=torch.bfloat16, device="cuda")
        return torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` for [N, G, D] queries and [N, L, D] keys, in fp32 ([N, G, L]): on CUDA straight from
    the GEMM's fp32 accumulator (no rounding to bf16 before the softmax, as a fused attention kernel
    keeps them), elsewhere the product cast."""
    if q.is_cuda and q.dtype != torch.float32 and _bmm_out_dtype_works():
        return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q, k.transpose(1, 2)).float()


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def steer_add(h: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``h + gate * delta``: the steering add, ``delta`` (the vector's ``alpha * v``, fp32) cast to h's
    dtype as the hook does; ``gate`` (h's dtype, broadcastable) is 1 where the position is steered."""
    return h + gate * delta.to(h.dtype)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, greedy: bool,
                  use_top_p: bool) -> torch.Tensor:
    """One token per row from fp32 logits [B, V], on the device, no host sync.

    Sampling follows HF's processors (temperature, then top-p keeping at least one token) and draws
    from the softmax with the exponential race (argmax of p / E, E ~ Exp(1)), which picks token i
    with probability p_i, like ``multinomial``; it is what a CUDA graph can hold.
    """
    if greedy:
        return logits.argmax(-1)
    scores = logits / temperature
    if use_top_p:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        remove = remove.scatter(1, order, remove)
        scores = scores.masked_fill(remove, float("-inf"))
    probs = scores.softmax(-1)
    race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / race).argmax(-1)


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable
    add_rms_norm: Callable
    qk_rope: Callable
    rope_kv: Callable
    attention_probs: Callable
    silu_mul: Callable
    steer_add: Callable
    compiled: bool = False


EAGER_OPS = Ops(rms_norm, add_rms_norm, qk_rope, rope_kv, attention_probs, silu_mul, steer_add)


@lru_cache(maxsize=1)
def fused_ops() -> Ops:
    """The same functions through ``torch.compile`` (no CUDA graphs of its own: the engine captures)."""
    def compile_(fn):
        return torch.compile(fn, fullgraph=True)

    return Ops(compile_(rms_norm), compile_(add_rms_norm), compile_(qk_rope), compile_(rope_kv),
               compile_(attention_probs), compile_(silu_mul), compile_(steer_add), compiled=True)
