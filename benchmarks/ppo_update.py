"""Time split and peak memory of one PPO update on a LoRA policy at the full-size shape, on one GPU.

The base is Llama-3-8B-shaped (32 layers, hidden 4096, vocab 128,256) with random bf16 weights built
on the GPU, optionally quantized in place to 4-bit NF4 (bitsandbytes), with a fresh LoRA adapter
(rank 16, every linear layer) and a value head. The reward is the local judge on the same weights
(adapter off, no second copy), the embedded default's reward. The script runs a few updates through
the real module and Lightning loop and prints, for the last one: generation, judge wait, score
pass and PPO epochs (seconds), optimizer steps and peak memory.

    python benchmarks/ppo_update.py --tokenizer PATH --batch_size 4 --ppo_epochs 3 --new_tokens 120
    python benchmarks/ppo_update.py --tokenizer PATH --batch_size 32 --four_bit

``--tokenizer``: any chat tokenizer folder (the model is random: only the template and special
tokens matter); ids beyond its vocabulary decode to nothing. Random weights never sample the end
token, so every reply is ``new_tokens`` long.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.rollout_baseline import SHAPES  # noqa: E402
from callbacks.judge_batching import JudgeBatching  # noqa: E402
from datamodules.prompts import PromptDataModule  # noqa: E402
from modules.ppo import PPO  # noqa: E402


def quantize_in_place(model: torch.nn.Module) -> None:
    """Swap every decoder Linear for a bitsandbytes NF4 Linear4bit holding the same (random) weights."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                                  compute_dtype=torch.bfloat16, quant_type="nf4")
                    quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                         quant_type="nf4").cuda()
                    setattr(parent, name, quantized)
                    del child
        torch.cuda.empty_cache()


class RandomBasePPO(PPO):
    """PPO whose base model is built on the GPU from a config, with random weights."""

    tokenizer_path = ""
    shape = "llama3-8b"
    four_bit = False

    def load_base(self, model: str, dtype: str, load_in_4bit: bool):
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        config = LlamaConfig(**SHAPES[self.shape], eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a smoke test of the script
        with torch.device(device):
            lm = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
        lm.eval().requires_grad_(False)
        if self.four_bit:
            quantize_in_place(lm)
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
        return lm, tokenizer


class Timings(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.rows.append({k: m.get(k) for k in ("time/rollout_batch_s", "time/generate_s", "time/judge_wait_s",
                                                 "time/score_s", "time/update_s", "ppo/optimizer_steps",
                                                 "rollout/tokens_per_s", "response/length")})
        self.rows[-1]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--ppo_epochs", type=int, default=3)
    parser.add_argument("--num_minibatches", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=120)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--four_bit", action="store_true")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    RandomBasePPO.tokenizer_path, RandomBasePPO.shape, RandomBasePPO.four_bit = args.tokenizer, args.shape, args.four_bit
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    module = RandomBasePPO(model=f"random-{args.shape}", dtype="bfloat16" if on_gpu else "float32", lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                           batch_size=args.batch_size, grad_accum=args.grad_accum, ppo_epochs=args.ppo_epochs,
                           num_minibatches=args.num_minibatches, total_updates=args.updates,
                           max_new_tokens=args.new_tokens, entropy_coef=0.01, lr=1e-5)
    build_s = time.perf_counter() - start
    weights_gib = torch.cuda.memory_allocated() / 2**30 if on_gpu else float("nan")
    data = PromptDataModule(prompts_per_update=module.prompts_per_update)
    timings = Timings()
    trainer = L.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[timings, JudgeBatching()])
    trainer.fit(module, datamodule=data)
    last = timings.rows[-1]
    result = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "shape": args.shape, "four_bit": args.four_bit,
              "batch_size": args.batch_size, "grad_accum": args.grad_accum, "ppo_epochs": args.ppo_epochs,
              "num_minibatches": args.num_minibatches, "new_tokens": args.new_tokens, "build_s": build_s,
              "weights_gib": weights_gib, "last_update": last, "per_update": timings.rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"ppo_update_b{args.batch_size}{'_4bit' if args.four_bit else ''}.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(f"\n| {result['device']} | base {'NF4' if args.four_bit else 'bf16'}, batch {args.batch_size} x accum "
          f"{args.grad_accum}, {args.new_tokens} new tokens, {args.ppo_epochs} epochs x {args.num_minibatches} minibatches |")
    print("|---|---|")
    for key, value in last.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    print(f"| weights after build (GiB) | {weights_gib:.2f} |")


if __name__ == "__main__":
    main()
