"""Decode-step speed of steered generation, side by side: HF generate (eager, and static cache +
compile) and the rollout engine, as ratios to the GEMM ceiling measured in the same call.

The model is shaped like Llama-3-8B (``--shape llama3-8b``, the default) or Qwen3-8B (``qwen3-8b``, with
its q/k RMSNorm) with random bf16 weights built on the GPU, a steering vector at the middle layer (16 of
32, 18 of 36; post-attention RMSNorm, every position) on in every path. Prompts are 64 random tokens, every
fourth row left-padded by 8. ms per decode step = (time of N new tokens - time of 1) / (N - 1), the
median of a few runs after a warm-up (which, for the engine, captures its graphs). Random weights
practically never draw the end token, so every row runs N steps.

Before timing it checks the engine at this shape: its logits against a plain forward over the same
tokens, and its greedy tokens against HF generate's.

    python benchmarks/rollout.py --ceiling_script .device/gemm_ceiling.py [--shape qwen3-8b] \\
        [--batches 8 32 128] [--new_tokens 120 512] [--budget_s 420]

The ceiling script is called with the same ``--shape``. Prints a markdown table and writes
``$OUT/rollout_bench.json``. ``--shape tiny`` and ``--shape tiny-qwen3`` run anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from modules.engine import RolloutEngine  # noqa: E402
from modules.models.steering import Steering, SteeringVector  # noqa: E402
from modules.rollout import Rollout, response_hidden_states  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=True)
SHAPES = {  # name: (config class, model class, config kwargs); llama3-8b and tiny as in benchmarks/rollout_baseline.py
    "llama3-8b": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    "qwen3-8b": (Qwen3Config, Qwen3ForCausalLM, dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=151645)),
    "tiny": (LlamaConfig, LlamaForCausalLM, TINY),
    "tiny-qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(TINY, head_dim=16)),  # Qwen3Config's head_dim defaults to 128
}
PROMPT_LEN, PAD_EVERY, PAD_LEN = 64, 4, 8
EOS = 128001  # Llama-3's end token, modulo the vocab where a shape names none; random weights hardly ever draw it


def build(shape: str, device: str):
    config_class, model_class, kwargs = SHAPES[shape]
    config = config_class(**{"eos_token_id": EOS % kwargs["vocab_size"], **kwargs}, pad_token_id=0, bos_token_id=1)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    vector = SteeringVector(config.hidden_size, alpha_init=1.0).to(device)
    with torch.no_grad():
        vector.v.normal_(0, 0.05)
    steering = Steering(model, vector, config.num_hidden_layers // 2, "post_attn_norm", "all")
    return model, steering


def prompts(batch: int, vocab: int, device: str):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, vocab, (batch, PROMPT_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[::PAD_EVERY, :PAD_LEN] = 0
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs (synchronized)."""
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def hf_generate(model, ids, mask, n: int, static: bool = False, streamer=None):
    extra = dict(cache_implementation="static") if static else {}
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=0, eos_token_id=model.config.eos_token_id,
                          streamer=streamer, **extra)


class StepClock:
    """A streamer that only notes when each step's tokens arrive (the first call brings the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def step_ms(run, n: int, repeats: int) -> tuple[float, float]:
    """(prefill ms, ms per decode step) from runs of 1 and ``n`` new tokens."""
    one = timed(lambda: run(1), max(repeats, 3))
    full = timed(lambda: run(n), repeats)
    return one * 1e3, (full - one) / (n - 1) * 1e3


def check_engine(model, engine: RolloutEngine, device: str) -> dict:
    """Engine vs a plain forward (logits) and vs HF generate (greedy tokens), at this shape."""
    ids, mask = prompts(8, model.config.vocab_size, device)
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = engine.generate(ids, mask, 24, [eos], 0, greedy=True, keep_logits=True)
        tokens = out.tokens
        batch = Rollout([""] * 8, ids, mask, tokens, torch.ones_like(tokens), [""] * 8)
        plain = model.get_output_embeddings()(response_hidden_states(model, batch)).float()
        hf_out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                                min_new_tokens=24, pad_token_id=0, eos_token_id=eos, output_logits=True,
                                return_dict_in_generate=True)
        hf, hf_logits = hf_out.sequences[:, PROMPT_LEN:], torch.stack(hf_out.logits, 1).float()
        hf_batch = Rollout([""] * 8, ids, mask, hf, torch.ones_like(hf), [""] * 8)
        hf_plain = model.get_output_embeddings()(response_hidden_states(model, hf_batch)).float()
    same_prefix = [int((row_e != row_h).long().cumsum(0).eq(0).sum()) for row_e, row_h in zip(tokens, hf)]

    def compare(sampled, forward):  # the same bf16 noise measures for both paths
        diff = (sampled - forward).abs()
        return {"max_abs_logit_diff": round(float(diff.max()), 4), "mean_abs_logit_diff": round(float(diff.mean()), 5),
                "argmax_agreement": round(float((sampled.argmax(-1) == forward.argmax(-1)).float().mean()), 4)}

    return {"graphs": out.graphs, "logit_scale": float(plain.abs().max()), "engine_vs_plain_forward": compare(
        out.logits, plain), "hf_generate_vs_plain_forward": compare(hf_logits, hf_plain),
        "greedy_tokens_equal_hf_prefix": same_prefix}


def profile_step(engine: RolloutEngine, ids, mask, n: int, eos: list[int]) -> dict:
    """GPU time of the engine's decode kernels by kind, over the replays of one rollout."""
    from torch.profiler import ProfilerActivity, profile

    engine.generate(ids, mask, n, eos, 0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(ids, mask, n, eos, 0)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        us = event.self_device_time_total
        if us <= 0:
            continue
        name = event.key.lower()
        kind = ("gemm" if any(k in name for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas")) else
                "attention" if any(k in name for k in ("fmha", "attention", "flash", "efficient")) else
                "fused (triton)" if "triton" in name else "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
        top.append((us, event.count, event.key[:90]))
    steps = n  # prefill + n - 1 decode steps; per-step figures are approximate (prefill included)
    top.sort(reverse=True)
    return {"ms_per_step_by_kind": {k: round(v / steps / 1e3, 3) for k, v in sorted(kinds.items())},
            "kernels_per_step": round(sum(c for _, c, _ in top) / steps, 1),
            "top_kernels": [{"us_per_step": round(us / steps, 1), "calls_per_step": round(c / steps, 1), "name": k}
                            for us, c, k in top[:15]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ceiling_script", default="")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[120, 512])
    parser.add_argument("--hf_eager_tokens", type=int, default=120)
    parser.add_argument("--static_compile_batch", type=int, default=32, help="0 skips HF static cache + compile")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="GPU time by kernel kind of ours at batch 32")
    parser.add_argument("--lora_row", action="store_true",
                        help="last: ours with a LoRA adapter at each batch (fused groups), and peft's layers at 32")
    parser.add_argument("--lora_only", action="store_true", help="skip every row but the ceiling and the LoRA rows")
    parser.add_argument("--group_prefill", type=int, nargs=2, default=None, metavar=("G", "PROMPT_LEN"),
                        help="also time the prompt pass of 64 rows as 64/G prompts x G samples of PROMPT_LEN "
                             "tokens, shared per prompt and run row by row")
    parser.add_argument("--budget_s", type=float, default=420.0, help="skip what would start after this")
    parser.add_argument("--four_bit", action="store_true",
                        help="the base's decoder linears in bitsandbytes NF4 (the ceiling stays bf16's)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    began = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "rows": []}
    out_file = Path(args.out) / "rollout_bench.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)

    def save():
        out_file.write_text(json.dumps(result, indent=2))

    ceiling: dict[int, float] = {}
    if args.ceiling_script:
        proc = subprocess.run([sys.executable, args.ceiling_script, "--shape", args.shape], capture_output=True,
                              text=True)
        text = proc.stdout
        print(text, flush=True)
        if proc.returncode:
            print(f"ceiling script failed (exit {proc.returncode}): {proc.stderr[-2000:]}", flush=True)
        ceiling = {r["M"]: r["step_ms"] for r in (json.loads(x) for x in text.splitlines() if x.startswith("{"))}
        result["ceiling_ms"] = ceiling
        result["ceiling_note"] = next((x for x in text.splitlines() if x.startswith("weights")), "")

    model, steering = build(args.shape, device)
    eos = [model.config.eos_token_id]
    if args.four_bit:
        from benchmarks.update_cost import quantize_in_place

        quantize_in_place(model)
        result["four_bit"] = "nf4"
    engine = RolloutEngine(model)
    try:
        result["check"] = check_engine(model, engine, device)
    except Exception as err:  # noqa: BLE001 - report and go on timing
        result["check"] = {"error": f"{type(err).__name__}: {err}"}
    print("engine check at this shape:", json.dumps(result["check"]), flush=True)
    save()

    def add(path: str, batch: int, n: int, prefill_ms: float, ms: float, **extra):
        c = ceiling.get(batch)
        row = {"path": f"NF4 base: {path}" if args.four_bit else path, "batch": batch, "new_tokens": n, "prefill_ms": round(prefill_ms, 2),
               "ms_per_step": round(ms, 3), "tokens_per_s": round(batch / ms * 1e3),
               "ceiling_ms": c, "vs_ceiling": round(ms / c, 3) if c else None, **extra}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - began)

    for batch in ([] if args.lora_only else args.batches):
        ids, mask = prompts(batch, model.config.vocab_size, device)
        for n in sorted(args.new_tokens, reverse=True):  # the largest first: its cache serves the others
            if left() < 20:
                print(f"skipping ours at batch {batch} x {n}: out of budget", flush=True)
                continue
            try:
                def ours(k, n=n):
                    engine.generate(ids, mask, k, eos, 0, temperature=1.0, top_p=1.0)
                warm = timed(lambda: ours(n), 1)
                add("ours", batch, n, *step_ms(ours, n, args.repeats), first_call_s=round(warm, 2),
                    graphs_captured=engine.captures)
            except Exception as err:  # noqa: BLE001
                print(f"ours failed at batch {batch} x {n}: {type(err).__name__}: {err}", flush=True)
        if left() > 40 and args.hf_eager_tokens:
            n = args.hf_eager_tokens
            try:
                timed(lambda: hf_generate(model, ids, mask, 4), 1)
                add("HF generate eager (dynamic cache)", batch, n,
                    *step_ms(lambda k: hf_generate(model, ids, mask, k), n, 1))
            except Exception as err:  # noqa: BLE001
                print(f"HF eager failed at batch {batch}: {type(err).__name__}: {err}", flush=True)

    if device == "cuda" and args.profile and 32 in args.batches and left() > 30 and not args.lora_only:
        try:
            ids, mask = prompts(32, model.config.vocab_size, device)
            result["profile_batch32"] = profile_step(engine, ids, mask, min(args.new_tokens), eos)
            print("profile of ours, batch 32:", json.dumps(result["profile_batch32"], indent=1), flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"profile failed: {type(err).__name__}: {err}", flush=True)
        save()

    if device == "cuda" and 32 in args.batches and left() > 30 and not args.lora_only:  # the fused kernels' share
        plain = RolloutEngine(model, compile_kernels=False)
        ids, mask = prompts(32, model.config.vocab_size, device)
        n = min(args.new_tokens)
        try:
            timed(lambda: plain.generate(ids, mask, n, eos, 0), 1)
            add("ours, plain (unfused) kernels", 32, n,
                *step_ms(lambda k: plain.generate(ids, mask, k, eos, 0), n, args.repeats))
        except Exception as err:  # noqa: BLE001
            print(f"ours (plain kernels) failed: {type(err).__name__}: {err}", flush=True)
        del plain
        # one change of ours undone at a time, the same weights and shapes
        for label, options in [("ours, separate q/k/v and gate/up GEMMs", dict(fuse_projections=False)),
                               ("ours, torch's default BLAS in the graphs", dict(blas_library=None))]:
            variant = RolloutEngine(model, **options)
            try:
                timed(lambda: variant.generate(ids, mask, n, eos, 0), 1)
                add(label, 32, n, *step_ms(lambda k: variant.generate(ids, mask, k, eos, 0), n, args.repeats))
            except Exception as err:  # noqa: BLE001
                print(f"{label} failed: {type(err).__name__}: {err}", flush=True)
            variant.release()
            del variant

    if args.group_prefill and left() > 30:  # GRPO: the G samples of one prompt share its prompt pass
        group, length = args.group_prefill
        g = torch.Generator().manual_seed(group)
        ids = torch.randint(2, model.config.vocab_size, (64 // group, length), generator=g)
        ids = ids.repeat_interleave(group, 0).to(device)
        mask = torch.ones_like(ids)
        for shared in (True, False):
            variant = RolloutEngine(model, share_prompt_pass=shared)
            try:
                timed(lambda: variant.generate(ids, mask, 2, eos, 0), 1)
                ms = timed(lambda: variant.generate(ids, mask, 1, eos, 0), max(args.repeats, 3)) * 1e3
                add(f"prompt pass + first token, {64 // group} prompts x {group} samples of {length} tokens, "
                    + ("shared per prompt" if shared else "row by row"), ids.shape[0], 1, ms, ms)
            except Exception as err:  # noqa: BLE001
                print(f"group prefill (shared={shared}) failed: {type(err).__name__}: {err}", flush=True)
            variant.release()
            del variant

    batch = args.static_compile_batch
    if device == "cuda" and batch and left() > 150 and not args.lora_only:
        engine._states.clear()
        torch.cuda.empty_cache()
        ids, mask = prompts(batch, model.config.vocab_size, device)
        n = min(args.new_tokens)
        try:  # one shape only (a second would compile again): per-step times from a streamer
            started = time.perf_counter()
            timed(lambda: hf_generate(model, ids, mask, n, static=True), 1)
            compile_s = time.perf_counter() - started
            clock = StepClock()
            timed(lambda: hf_generate(model, ids, mask, n, static=True, streamer=clock), 1)
            add("HF generate static cache + compile", batch, n, (clock.times[1] - clock.times[0]) * 1e3,
                (clock.times[-1] - clock.times[1]) / (len(clock.times) - 2) * 1e3, first_call_s=round(compile_s, 1))
        except Exception as err:  # noqa: BLE001
            print(f"HF static+compile failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
    else:
        print("skipping HF static cache + compile (budget or device)", flush=True)

    if device == "cuda" and args.lora_row and left() > 25:  # a PPO/GRPO-style policy: LoRA r=16 on every linear
        try:
            from peft import LoraConfig, get_peft_model

            engine.release()
            policy = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
            policy.eval()
            with torch.no_grad():
                for name, param in policy.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.01)
            lora_engine = RolloutEngine(policy)
            result["lora_check"] = check_engine(policy, lora_engine, device)
            print("LoRA engine check at this shape:", json.dumps(result["lora_check"]), flush=True)
            n = min(args.new_tokens)
            for batch in args.batches:
                if left() < 25:
                    break
                ids, mask = prompts(batch, model.config.vocab_size, device)
                timed(lambda: lora_engine.generate(ids, mask, n, eos, 0), 1)
                add("ours, LoRA r=16 all-linear (adapters fused per projection group)", batch, n,
                    *step_ms(lambda k: lora_engine.generate(ids, mask, k, eos, 0), n, args.repeats))
            lora_engine.release()
            if 32 in args.batches and left() > 25:  # the same adapter through peft's own layers, as before
                peft_engine = RolloutEngine(policy, fuse_projections=False)
                ids, mask = prompts(32, model.config.vocab_size, device)
                timed(lambda: peft_engine.generate(ids, mask, n, eos, 0), 1)
                add("ours, LoRA r=16 all-linear (peft's layers, unfused)", 32, n,
                    *step_ms(lambda k: peft_engine.generate(ids, mask, k, eos, 0), n, args.repeats))
        except Exception as err:  # noqa: BLE001
            print(f"LoRA row failed: {type(err).__name__}: {err}", flush=True)

    result["seconds"] = round(time.perf_counter() - began, 1)
    save()
    dtype, layer = "bf16" if device == "cuda" else "fp32", model.config.num_hidden_layers // 2
    print(f"\n{result['device']}, {result['date']}, torch {result['torch']}; {args.shape} shape, random {dtype} "
          f"weights, steering on (layer {layer}, post-attention norm, all positions); prompts {PROMPT_LEN} tokens\n")
    print("| path | batch | new tokens | ms / decode step | tokens/s | GEMM ceiling ms | vs ceiling |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        ratio = f"{r['vs_ceiling']:.2f}x" if r["vs_ceiling"] else "-"
        print(f"| {r['path']} | {r['batch']} | {r['new_tokens']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']} | "
              f"{r['ceiling_ms'] or '-'} | {ratio} |")


if __name__ == "__main__":
    main()
