"""Decode attention with its KV-cache write, alone: which formulation is fastest at the engine's shapes?

One decode step of a Llama-3-8B-shaped model attends 32 layers; this times that loop (captured as a
CUDA graph, as the engine runs it) for a few ways of writing the new key/value and attending over the
first L cache columns with an additive mask (padding and not-yet-written columns):

- ``sdpa, 2 index_copy``: what the engine does (separate K and V caches, SDPA picks its kernel);
- ``sdpa, 1 index_copy``: K and V in one cache tensor, written by one ``index_copy_``;
- ``bmm``: scores by ``matmul``, mask, fp32 softmax, ``matmul`` (the math backend by hand);
- ``bmm, compiled``: the same through ``torch.compile`` (mask, scale and softmax fused).

    python benchmarks/decode_attention.py [--batch 32] [--lengths 128 192 576]

Prints microseconds per layer for each and the largest difference of each output from the first.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

LAYERS, KV_HEADS, GROUPS, HEAD_DIM = 32, 8, 4, 128


def timed_graph(fn, repeats: int = 20) -> float:
    """Microseconds per call of ``fn`` (which runs all layers), captured as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats / LAYERS


def attend_bmm(q, k, v, mask, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + mask
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 192, 576])
    parser.add_argument("--capacity", type=int, default=640)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, dt, b = "cuda", torch.bfloat16, args.batch
    scale = HEAD_DIM ** -0.5
    k_cache = torch.randn(LAYERS, b, KV_HEADS, args.capacity, HEAD_DIM, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    kv_cache = torch.stack([k_cache, v_cache], 1).contiguous()  # [layers, 2, B, H, cap, D]
    q = torch.randn(b, KV_HEADS, GROUPS, HEAD_DIM, device=dev, dtype=dt)
    new_k = torch.randn(b, KV_HEADS, 1, HEAD_DIM, device=dev, dtype=dt)
    new_v = torch.randn_like(new_k)
    new_kv = torch.stack([new_k, new_v])
    out = torch.empty(LAYERS, b, KV_HEADS, GROUPS, HEAD_DIM, device=dev, dtype=dt)
    compiled = torch.compile(attend_bmm, fullgraph=True, dynamic=False)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {b}, {LAYERS} layers, "
          f"{KV_HEADS} KV heads x {GROUPS} queries, head dim {HEAD_DIM}")
    print(f"{'L':>5} {'variant':<22} {'us/layer':>9} {'max |diff|':>11}")
    for length in args.lengths:
        pos = torch.tensor([length - 1], device=dev)
        valid = torch.ones(b, length, dtype=torch.bool, device=dev)
        valid[::4, :8] = False  # left padding of every fourth row
        mask = torch.zeros(b, 1, 1, length, device=dev, dtype=dt).masked_fill(~valid[:, None, None], float("-inf"))
        mask32 = mask.float()

        def sdpa_two():
            for i in range(LAYERS):
                k_cache[i].index_copy_(2, pos, new_k)
                v_cache[i].index_copy_(2, pos, new_v)
                out[i] = F.scaled_dot_product_attention(q, k_cache[i, :, :, :length], v_cache[i, :, :, :length],
                                                        attn_mask=mask, scale=scale)

        def sdpa_one():
            for i in range(LAYERS):
                kv_cache[i].index_copy_(3, pos, new_kv)
                out[i] = F.scaled_dot_product_attention(q, kv_cache[i, 0, :, :, :length],
                                                        kv_cache[i, 1, :, :, :length], attn_mask=mask, scale=scale)

        def bmm():
            for i in range(LAYERS):
                kv_cache[i].index_copy_(3, pos, new_kv)
                out[i] = attend_bmm(q, kv_cache[i, 0, :, :, :length], kv_cache[i, 1, :, :, :length], mask32, scale)

        def bmm_compiled():
            for i in range(LAYERS):
                kv_cache[i].index_copy_(3, pos, new_kv)
                out[i] = compiled(q, kv_cache[i, 0, :, :, :length], kv_cache[i, 1, :, :, :length], mask32, scale)

        reference = None
        for name, fn in [("sdpa, 2 index_copy", sdpa_two), ("sdpa, 1 index_copy", sdpa_one), ("bmm", bmm),
                         ("bmm, compiled", bmm_compiled)]:
            try:
                us = timed_graph(fn)
                fn()
                result = out.float().clone()
                reference = result if reference is None else reference
                print(f"{length:>5} {name:<22} {us:>9.2f} {(result - reference).abs().max().item():>11.3g}", flush=True)
            except Exception as err:  # noqa: BLE001
                print(f"{length:>5} {name:<22} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")

    # the decode step's weight GEMMs under each BLAS library torch offers (M = batch rows)
    print(f"\n{'GEMM (out x in)':<18} {'library':<9} {'us':>7} {'TB/s':>6}")
    x = {n: torch.randn(b, n, device=dev, dtype=dt) for n in (4096, 14336)}
    for rows, cols in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        weights = [torch.randn(rows, cols, device=dev, dtype=dt) for _ in range(LAYERS)]
        for library in ("cublas", "cublaslt"):
            try:
                torch.backends.cuda.preferred_blas_library(library)
                y = torch.empty(b, rows, device=dev, dtype=dt)

                def gemms(weights=weights):  # bound now: the loop deletes the name below
                    for w in weights:
                        torch.matmul(x[cols], w.t(), out=y)

                us = timed_graph(gemms)
                print(f"{f'{rows} x {cols}':<18} {library:<9} {us:>7.2f} {rows * cols * 2 / us / 1e6:>6.2f}", flush=True)
            except Exception as err:  # noqa: BLE001
                print(f"{rows} x {cols} {library} failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
        del weights
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
