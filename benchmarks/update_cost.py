"""Time split and peak memory of one update of a LoRA method at full size, on one GPU.

Methods (``--method``), each through the real module and Lightning loop, with random bf16 weights
built on the GPU (optionally quantized in place to 4-bit NF4 with bitsandbytes):

- ``ppo``: PPO on a Llama-3-8B-shaped base + LoRA + value head; reward: the local judge on the same
  weights (adapter off), the embedded default's reward.
- ``sarm``: SARMFeaturePPO on a Llama-3.1-8B-shaped base; reward: a SARM-4B-shaped reward model
  (16 layers, 65,536 latents, TopK 192) with the seed's three feature penalties.
- ``oracle``: OracleGRPO on a Qwen3-8B-shaped base with an oracle LoRA; G replies per question,
  injection on the prompt pass; reward: the deterministic token-F1 judge.

For the last update it prints generation, reward wait, score pass and update (optimizer steps)
seconds, and peak memory; ``--four_bit`` quantizes the policy's base.

    python benchmarks/update_cost.py --method ppo --tokenizer PATH --batch_size 4 --ppo_epochs 3
    python benchmarks/update_cost.py --method sarm --tokenizer PATH --batch_size 2 --grad_accum 4 --four_bit
    python benchmarks/update_cost.py --method oracle --tokenizer PATH --batch_size 32 --grad_accum 2 --samples_per_prompt 8

``--tokenizer``: any chat tokenizer folder (the models are random: only the template and special
tokens matter); ids beyond its vocabulary decode to nothing. Random weights never sample the end
token, so every reply is ``new_tokens`` long. ``--shape tiny`` runs anywhere (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from benchmarks.rollout_baseline import SHAPES  # noqa: E402
from callbacks.judge_batching import JudgeBatching  # noqa: E402
from datamodules.prompts import PromptDataModule  # noqa: E402

ON_GPU = torch.cuda.is_available()  # the CPU only for a smoke test of the script with --shape tiny
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=8192,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY_QWEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=1024,
                 tie_word_embeddings=True)


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
        torch.cuda.empty_cache()


def random_base(tokenizer, shape: dict, qwen: bool, four_bit: bool):
    config_class, model_class = (Qwen3Config, Qwen3ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
    config = config_class(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if ON_GPU else "cpu"):
        lm = model_class(config).to(torch.bfloat16 if ON_GPU else torch.float32)
    lm.eval().requires_grad_(False)
    if four_bit:
        quantize_in_place(lm)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm


def with_random_base(method_class, tokenizer, base):
    """The method with ``load_base`` returning the prebuilt random base."""
    return type("Random" + method_class.__name__, (method_class,),
                {"load_base": lambda self, model, dtype, load_in_4bit: (base, tokenizer)})


class Timings(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {k: m.get(k) for k in ("time/rollout_batch_s", "time/generate_s", "time/reward_submit_s",
                                     "time/judge_wait_s", "time/score_s",
                                     "time/update_s", "ppo/optimizer_steps", "rollout/tokens_per_s",
                                     "response/length")}
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None
        self.rows.append(row)


def train_timed(module, data) -> list[dict]:
    """Fit ``module`` on one device with the peak memory counted from now (after the build); the
    timings of each update."""
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()  # the peak of training, not of building (a 4-bit base starts in bf16)
    timings = Timings()
    trainer = L.Trainer(accelerator="gpu" if ON_GPU else "cpu", devices=1, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[timings, JudgeBatching()])
    trainer.fit(module, datamodule=data)
    return timings.rows


def build(args, tokenizer):
    """(module, data module) for ``args.method``."""
    common = dict(model=f"random-{args.method}", dtype="bfloat16" if ON_GPU else "float32", lora_r=args.lora_r,
                  lora_alpha=2 * args.lora_r, batch_size=args.batch_size, grad_accum=args.grad_accum,
                  total_updates=args.updates, max_new_tokens=args.new_tokens, lr=1e-5,
                  update_batch_size=args.update_batch_size, gradient_checkpointing=args.gradient_checkpointing,
                  generation_batch_size=getattr(args, "generation_batch_size", None))
    if args.method == "oracle":
        from modules.models.adapters import LoRAPolicy
        from modules.oracle_grpo import OracleGRPO

        base = random_base(tokenizer, QWEN3_8B if args.shape != "tiny" else TINY_QWEN, True, args.four_bit)
        adapter = Path(tempfile.mkdtemp()) / "oracle_adapter"
        lora = LoRAPolicy(base, r=args.lora_r, alpha=2 * args.lora_r)
        lora.save(adapter)
        base = lora.model.unload()  # the same weights, without the LoRA layers
        common.pop("lora_r"), common.pop("lora_alpha")
        module = with_random_base(OracleGRPO, tokenizer, base)(
            adapter_path=str(adapter), samples_per_prompt=args.samples_per_prompt, num_positions=8,
            loss_type=getattr(args, "loss_type", "dr_grpo"),
            format_system_prompt="Reply as [epistemic status: X] Answer.", **common)
        data = PromptDataModule(train_file="datamodules/data/oracle_train.jsonl", heldout_file=None,
                                jsonl_field="question", prompts_per_update=module.prompts_per_update)
        return module, data
    shape = SHAPES[args.shape]
    base = random_base(tokenizer, shape, False, args.four_bit)
    ppo_options = dict(ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches, entropy_coef=0.01, **common)
    if args.method == "sarm":
        from modules.sarm.random_sarm import random_sarm_model
        from modules.sarm.reward import SARMReward
        from modules.sarm_ppo import SARMFeaturePPO

        reward = SARMReward(model="random-sarm-4b", penalize_features=[48659, 28879, 26446] if args.shape != "tiny"
                            else [3, 7, 11], tau_values=[3.0], alpha_values=[0.1])
        eot = tokenizer.eos_token_id  # the end-of-turn token of the carried tokenizer's chat template
        if args.shape == "tiny":
            reward.rm = random_sarm_model(shape, 2, 64, 8, dtype=torch.float32, device="cpu", tokenizer=tokenizer,
                                          end_token_id=eot)
        else:
            reward.rm = random_sarm_model(shape, 16, 65536, 192, device="cuda", tokenizer=tokenizer, end_token_id=eot)
        module = with_random_base(SARMFeaturePPO, tokenizer, base)(reward=reward, **ppo_options)
    else:
        from modules.ppo import PPO

        module = with_random_base(PPO, tokenizer, base)(**ppo_options)
    return module, PromptDataModule(prompts_per_update=module.prompts_per_update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("ppo", "sarm", "oracle"), default="ppo")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--samples_per_prompt", type=int, default=8)
    parser.add_argument("--ppo_epochs", type=int, default=3)
    parser.add_argument("--num_minibatches", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=120)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--four_bit", action="store_true")
    parser.add_argument("--update_batch_size", type=int, default=None, help="Rows per forward/backward chunk.")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--generation_batch_size", type=int, default=None, help="Rows per generate call.")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--loss_type", default="dr_grpo", help="OracleGRPO's loss aggregation (--method oracle).")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    module, data = build(args, tokenizer)
    build_s = time.perf_counter() - start
    weights_gib = torch.cuda.memory_allocated() / 2**30 if ON_GPU else float("nan")
    rows = train_timed(module, data)
    last = rows[-1]
    result = {"device": torch.cuda.get_device_name() if ON_GPU else "cpu", "method": args.method, "shape": args.shape,
              "four_bit": args.four_bit, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
              "samples_per_prompt": args.samples_per_prompt if args.method == "oracle" else 1,
              "ppo_epochs": args.ppo_epochs, "num_minibatches": args.num_minibatches, "new_tokens": args.new_tokens,
              "update_batch_size": args.update_batch_size, "gradient_checkpointing": args.gradient_checkpointing,
              "generation_batch_size": args.generation_batch_size,
              "build_s": build_s, "weights_gib": weights_gib, "last_update": last, "per_update": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = (f"update_cost_{args.method}_b{args.batch_size}x{args.grad_accum}{'_4bit' if args.four_bit else ''}"
            f"{'_gc' if args.gradient_checkpointing else ''}.json")
    (Path(args.out) / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(f"\n| {result['device']} | {args.method}, base {'NF4' if args.four_bit else 'bf16'}, batch {args.batch_size} x "
          f"accum {args.grad_accum}, {args.new_tokens} new tokens |")
    print("|---|---|")
    for key, value in last.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    print(f"| weights after build (GiB) | {weights_gib:.2f} |")


if __name__ == "__main__":
    main()
