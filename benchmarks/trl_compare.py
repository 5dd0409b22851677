"""OracleGRPO's update beside TRL's ``GRPOTrainer`` step on the same shape, batch, group size,
completion length, LoRA and loss, each in a process of its own (so each peak is its own), on one GPU.

Both sides: a Qwen3-8B-shaped base with random bf16 weights built on the GPU, LoRA r=16 (alpha 32)
on every linear layer, ``questions x G`` completions per optimizer step in ``grad_accum`` micro-batches
of ``batch_size``, ``new_tokens`` new tokens (random weights practically never draw the end token,
so every completion is that long), loss ``dapo``, beta 0 (no reference pass), one iteration,
gradient checkpointing off, sampling at temperature 1. TRL runs its HF-generate path (no vLLM) with
a cheap deterministic reward function; ours runs OracleGRPO through its Lightning loop (activation
extraction, injection and the token-F1 judge included: ours does more per step, not less).

    python benchmarks/trl_compare.py --tokenizer PATH [--steps 4] [--shape qwen3-8b|tiny] \
        [--ours 32:off 16:on 8:on]

``--ours`` lists our variants as ``update_batch_size:gradient_checkpointing[:generation_batch_size]``:
the same optimizer step computed in chunks of that many rows, with or without activation
checkpointing (our memory tools; TRL runs with checkpointing off, as configured here), and
optionally that many rows per generate call (default: one micro-batch; TRL generates the whole
step's completions in one call). Prints one table (seconds per optimizer step,
the median over the steps after the first; peak GPU memory after the model was built; the ratio to
TRL) with the device, and writes ``$OUT/trl_compare.json``. TRL is a benchmark-only dependency (``../shared/device/wheels.sh --trl``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ON_GPU = torch.cuda.is_available()


def _shape(name: str) -> dict:
    from benchmarks.update_cost import QWEN3_8B, TINY_QWEN

    return QWEN3_8B if name == "qwen3-8b" else TINY_QWEN


def _questions(count: int) -> list[str]:
    rows = Path(__file__).resolve().parents[1] / "datamodules" / "data" / "oracle_train.jsonl"
    questions = [json.loads(line)["question"] for line in rows.read_text().splitlines() if line.strip()]
    return (questions * (count // len(questions) + 1))[:count]


def run_ours(args) -> dict:
    """OracleGRPO for ``steps`` updates (one optimizer step each), timed by the update_cost harness."""
    from transformers import AutoTokenizer

    from benchmarks.update_cost import build, train_timed

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    options = argparse.Namespace(method="oracle", shape="tiny" if args.shape == "tiny" else "qwen3-8b",
                                 batch_size=args.batch_size, grad_accum=args.grad_accum,
                                 samples_per_prompt=args.samples_per_prompt, new_tokens=args.new_tokens,
                                 updates=args.steps, four_bit=False, update_batch_size=args.update_batch_size,
                                 gradient_checkpointing=args.gradient_checkpointing == "on", lora_r=16,
                                 ppo_epochs=1, num_minibatches=1, generation_batch_size=args.generation_batch_size,
                                 loss_type="dapo")
    rows = train_timed(*build(options, tokenizer))
    steps = [row["time/rollout_batch_s"] for row in rows]
    later = rows[1:] or rows
    split = {k.removeprefix("time/"): statistics.median(r[k] for r in later if r.get(k) is not None)
             for k in ("time/generate_s", "time/reward_submit_s", "time/judge_wait_s", "time/score_s", "time/update_s")
             if any(r.get(k) is not None for r in later)}
    return {"step_s": steps, "split_s": split,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None}


def run_trl(args) -> dict:
    """TRL's GRPOTrainer for ``steps`` optimizer steps, each timed from its first micro-batch (which
    generates the whole generation batch) to the optimizer step."""
    import pyarrow
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.update_cost import random_base

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = random_base(tokenizer, _shape(args.shape), qwen=True, four_bit=False)
    prompts_per_step = args.batch_size * args.grad_accum // args.samples_per_prompt
    rows = [{"prompt": [{"role": "user", "content": q}]} for q in _questions(prompts_per_step * (args.steps + 1))]
    dataset = Dataset(pyarrow.Table.from_pylist(rows), fingerprint="trl_compare")  # no hashing of the rows

    def reward(completions, **_) -> list[float]:  # cheap and deterministic: the reward is not what is timed
        return [float(len(str(c)) % 7) / 7 for c in completions]

    wanted = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=args.grad_accum, num_generations=args.samples_per_prompt,
                  max_completion_length=args.new_tokens, loss_type="dapo", beta=0.0, learning_rate=1e-5,
                  bf16=ON_GPU, gradient_checkpointing=False, max_steps=args.steps, logging_steps=1,
                  report_to="none", save_strategy="no", use_vllm=False, temperature=1.0, top_p=1.0, seed=0,
                  num_iterations=1, use_cpu=not ON_GPU)
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    config = GRPOConfig(**{k: v for k, v in wanted.items() if k in known})
    clock: dict = {"step_s": [], "started": None}

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if ON_GPU:
                torch.cuda.synchronize()
            clock["started"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            if ON_GPU:
                torch.cuda.synchronize()
            clock["step_s"].append(time.perf_counter() - clock["started"])

    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[StepClock()])
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    import trl

    return {"step_s": clock["step_s"], "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None,
            "trl": trl.__version__, "config_ignored": sorted(set(wanted) - known)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="Any chat tokenizer folder (the weights are random).")
    parser.add_argument("--shape", choices=("qwen3-8b", "tiny"), default="qwen3-8b")
    parser.add_argument("--batch_size", type=int, default=32, help="Completions per micro-batch.")
    parser.add_argument("--grad_accum", type=int, default=2, help="Micro-batches per optimizer step.")
    parser.add_argument("--samples_per_prompt", type=int, default=8, help="G: completions per question.")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ours", nargs="+", default=["32:off"],
                        help="Our variants, each update_batch_size:gradient_checkpointing (on/off).")
    parser.add_argument("--side", choices=("both", "ours", "trl"), default="both")
    parser.add_argument("--update_batch_size", type=int, default=None, help="(internal) one variant's chunk rows")
    parser.add_argument("--gradient_checkpointing", choices=("on", "off"), default="off", help="(internal)")
    parser.add_argument("--generation_batch_size", type=int, default=None, help="(internal) rows per generate call")
    parser.add_argument("--result", default=None, help="(internal) where a side writes its JSON")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.side != "both":
        result = run_ours(args) if args.side == "ours" else run_trl(args)
        Path(args.result).write_text(json.dumps(result))
        return

    device = torch.cuda.get_device_name() if ON_GPU else "cpu"
    sides = {}
    def variant(spec: str) -> list[str]:
        chunk, checkpointing, *generation = spec.split(":")
        return (["--update_batch_size", chunk, "--gradient_checkpointing", checkpointing]
                + (["--generation_batch_size", generation[0]] if generation else []))

    runs = [("trl", "trl", [])] + [(f"ours {v}", "ours", variant(v)) for v in args.ours]
    for label, side, extra in runs:
        out = Path(tempfile.mkdtemp()) / "side.json"
        command = [sys.executable, __file__, "--side", side, "--result", str(out), *extra]
        for name in ("tokenizer", "shape", "batch_size", "grad_accum", "samples_per_prompt", "new_tokens", "steps"):
            command += [f"--{name}", str(getattr(args, name))]
        started = time.perf_counter()
        done = subprocess.run(command)
        sides[label] = json.loads(out.read_text()) if done.returncode == 0 and out.is_file() else \
            {"error": f"exit status {done.returncode}"}
        sides[label]["wall_s"] = round(time.perf_counter() - started, 1)
        print(f"{label}: {json.dumps(sides[label])}", flush=True)

    def median_step(side: dict) -> float | None:
        steps = side.get("step_s") or []
        return statistics.median(steps[1:] or steps) if steps else None

    trl_side = sides["trl"]
    trl_step, trl_peak = median_step(trl_side), trl_side.get("peak_gib")
    for side in sides.values():
        step, peak = median_step(side), side.get("peak_gib")
        side["median_step_s"] = step
        side["time_vs_trl"] = step / trl_step if step and trl_step else None
        side["memory_vs_trl"] = peak / trl_peak if peak and trl_peak else None
    result = {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "setting": {k: getattr(args, k) for k in ("shape", "batch_size", "grad_accum", "samples_per_prompt",
                                                        "new_tokens", "steps")}, "runs": sides}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "trl_compare.json").write_text(json.dumps(result, indent=2))
    per_step = args.batch_size * args.grad_accum
    print(f"\n{device}, {result['date']}, torch {torch.__version__}, TRL {trl_side.get('trl', '?')}: "
          f"{args.shape}, LoRA r=16 all-linear, {per_step} completions ({per_step // args.samples_per_prompt} "
          f"questions x G={args.samples_per_prompt}) per optimizer step in {args.grad_accum} micro-batches, "
          f"{args.new_tokens} new tokens, loss dapo, beta 0\n")
    print("| trainer (update chunk rows : activation checkpointing [: rows per generate call]) "
          "| s / optimizer step (median) | peak GiB "
          "| time vs TRL | memory vs TRL |")
    print("|---|---|---|---|---|")
    for label, side in sides.items():
        name = f"TRL GRPOTrainer (HF generate; {args.batch_size} rows : off)" if label == "trl" else f"OracleGRPO ({label[5:]})"
        if side.get("median_step_s") and side.get("peak_gib"):
            print(f"| {name} | {side['median_step_s']:.2f} | {side['peak_gib']:.1f} | "
                  f"{side['time_vs_trl'] or 0:.2f}x | {side['memory_vs_trl'] or 0:.2f}x |")
        else:
            print(f"| {name} | {side.get('error', '-')} | - | - | - |")
        if side.get("split_s"):
            print(f"|   split (s, median) | {json.dumps({k: round(v, 3) for k, v in side['split_s'].items()})} "
                  "| | | |")


if __name__ == "__main__":
    main()
