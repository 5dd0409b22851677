"""Baseline speed and memory of SteeringVectorRL at the full-size shape, on one GPU.

The model is Llama-3-8B-shaped (32 layers, hidden 4096, vocab 128,256) with random bf16 weights built
on the GPU; the judge is the same model with the steering off (a local judge of the same shape, no
second copy). The script trains a few updates through the real module and Lightning loop at
``batch_size`` 32, times a 120-token steered decode separately, runs the GEMM-ceiling anchor in the
same process when its script is given, and prints a table. This is the baseline that a faster
rollout engine will be measured against.

    python benchmarks/rollout_baseline.py --tokenizer PATH [--ceiling_script PATH] [--updates 2]
        [--no-share_lower_layers]   # the loss pass over the whole model (the comparison in RESULTS.md)

``--tokenizer``: any chat tokenizer folder (the model is random, so only the template and the
special tokens matter); ids beyond its vocabulary decode to nothing, which makes the judge's
sequences a little shorter than the policy's.
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

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from callbacks.judge_batching import JudgeBatching  # noqa: E402
from datamodules.prompts import PromptDataModule, encode_prompts  # noqa: E402
from modules.steering_rl import SteeringVectorRL  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    # a smoke-test shape that runs anywhere in seconds
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=True),
}


class RandomLlama(SteeringVectorRL):
    """SteeringVectorRL whose policy is built on the GPU from a config, with random weights."""

    tokenizer_path = ""
    shape = "llama3-8b"
    build_device = "cuda"

    def load_policy(self, model: str, dtype: str):
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        config = LlamaConfig(**SHAPES[self.shape], eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(0)
        with torch.device(self.build_device):
            lm = LlamaForCausalLM(config).to(torch.bfloat16 if self.build_device == "cuda" else torch.float32)
        lm.eval().requires_grad_(False)
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
        return lm, tokenizer


class Timings(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.rows.append({k: m.get(k) for k in ("time/rollout_batch_s", "time/update_s", "time/score_s",
                                                 "time/generate_s", "time/judge_wait_s", "rollout/tokens_per_s",
                                                 "response/length")})


def decode_step_ms(module: SteeringVectorRL, prompts: list[str], new_tokens: int) -> tuple[float, float]:
    """Median (prefill ms, ms per decode step) of a steered generate at len(prompts) rows."""
    batch = encode_prompts(module.tokenizer, prompts).to(module.device)
    P = batch.input_ids.shape[1]

    sync = torch.cuda.synchronize if module.device.type == "cuda" else (lambda: None)

    def run(n):
        sync()
        start = time.perf_counter()
        with torch.no_grad(), module.steering.prompt_length(P):
            module.policy.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=True,
                                   top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=module.tokenizer.pad_token_id)
        sync()
        return (time.perf_counter() - start) * 1e3

    run(4)
    prefill = sorted(run(1) for _ in range(3))[1]
    full = sorted(run(new_tokens) for _ in range(3))[1]
    return prefill, (full - prefill) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--ceiling_script", default="")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=120)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--share_lower_layers", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-share_lower_layers: the loss pass runs the whole model again")
    args = parser.parse_args()

    ceiling = {}
    if args.ceiling_script:
        text = subprocess.run([sys.executable, args.ceiling_script], capture_output=True, text=True).stdout
        print(text, flush=True)
        rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        ceiling = {row["M"]: row["step_ms"] for row in rows}

    RandomLlama.tokenizer_path, RandomLlama.shape, RandomLlama.build_device = args.tokenizer, args.shape, args.device
    on_gpu = args.device == "cuda"
    module = RandomLlama(model=f"random-{args.shape}", hook_layer=SHAPES[args.shape]["num_hidden_layers"] // 2, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, total_updates=args.updates, max_new_tokens=args.new_tokens,
                         reward_mode="contrast", kl_coef=0.05, lr=0.005, share_lower_layers=args.share_lower_layers)
    data = PromptDataModule(prompts_per_update=args.batch_size * args.grad_accum)
    timings = Timings()
    trainer = L.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, max_steps=args.updates, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[timings, JudgeBatching()])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    peak_train = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    print("per update:", json.dumps(timings.rows), flush=True)
    module.to(args.device)  # Lightning's teardown moved the module back to the CPU
    prefill_ms, step_ms = decode_step_ms(module, data.train_prompts[: args.batch_size], args.new_tokens)

    last = timings.rows[-1]
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "shape": args.shape, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "new_tokens": args.new_tokens,
        "share_lower_layers": args.share_lower_layers, "rollout_batch_s": last["time/rollout_batch_s"],
        "score_s": last["time/score_s"], "update_s": last["time/update_s"],
        "generate_s_per_update": last["time/generate_s"],
        "judge_wait_s": last["time/judge_wait_s"], "rollout_tokens_per_s": last["rollout/tokens_per_s"],
        "prefill_ms": prefill_ms, "decode_step_ms": step_ms, "peak_memory_gib": peak_train,
        "ceiling_step_ms": ceiling.get(args.batch_size),
        "decode_vs_ceiling": step_ms / ceiling[args.batch_size] if args.batch_size in ceiling else None,
        "per_update": timings.rows,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "rollout_baseline.json" if args.share_lower_layers else "rollout_baseline_full_forward.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=2))
    print(f"\n| {result['device']} | batch {args.batch_size} x accum {args.grad_accum}, {args.new_tokens} new tokens |")
    print("|---|---|")
    for key in ("rollout_batch_s", "score_s", "update_s", "generate_s_per_update", "judge_wait_s",
                "rollout_tokens_per_s", "prefill_ms", "decode_step_ms", "ceiling_step_ms", "decode_vs_ceiling", "peak_memory_gib"):
        value = result[key]
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
