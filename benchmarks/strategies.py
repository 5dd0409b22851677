"""Strategy x method on several GPUs: does a method train under a strategy, at what time
per update and peak memory per GPU, and does ``--ckpt_path`` resume to the same trainable tensors?

Each cell is ``python cli.py fit`` with the method's embedded config (its reward and options) on a
random-weight Llama of a real shape (hidden 1024, 8 layers, SmolLM2's tokenizer), for ``--updates``
updates with a checkpoint after each; then the same run resumed from the second-to-last checkpoint
in a new folder. Resume is reported as the largest difference between the two runs' final exports
(``steering_vector.pt``; the PEFT adapter and value head). Every run of a method starts from the
same seed, data and weights, so its final exports are also compared with those of the method's
first strategy in the list (``vs first``: a strategy that lost or doubled a gradient shows here;
bf16 reductions in another order differ in the last bits).

    python benchmarks/strategies.py --tokenizer PATH --devices 2 --out results.json

Prints one row per cell as it ends (``fail`` rows carry the error's last line) and writes them all
to ``--out``. Cells not started before ``--budget_s`` are listed as not run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules, for the files a method needs
CONFIGS = {"steering": "configs/steering_rl_smollm2.yaml", "ppo": "configs/sycophancy_ppo_smollm2.yaml",
           "ppo_nf4": "configs/sycophancy_ppo_smollm2.yaml", "oracle": "configs/oracle_grpo_smollm2.yaml",
           "sarm": "configs/sarm_ppo_smollm2.yaml"}
# update_batch_size < batch_size: each optimizer step adds the gradients of two backward passes
SMALL = dict(steering=dict(batch_size=4, grad_accum=1, max_new_tokens=16, update_batch_size=2),
             ppo=dict(batch_size=4, grad_accum=1, max_new_tokens=16, ppo_epochs=1, num_minibatches=1,
                      update_batch_size=2),
             ppo_nf4=dict(batch_size=4, grad_accum=1, max_new_tokens=16, ppo_epochs=1, num_minibatches=1,
                          load_in_4bit=True, update_batch_size=2),
             oracle=dict(batch_size=8, grad_accum=1, max_new_tokens=16, update_batch_size=4),
             sarm=dict(batch_size=4, grad_accum=1, max_new_tokens=16, ppo_epochs=1, num_minibatches=1,
                       update_batch_size=2))
# the same rollouts in one backward pass: its update-1 gradient norm must equal steering's two-pass one
SMALL["steering_one_pass"] = dict(SMALL["steering"], update_batch_size=4)
CONFIGS["steering_one_pass"] = CONFIGS["steering"]
# the loss pass over the whole model again instead of from the steered layer: the same final vector
SMALL["steering_full_forward"] = dict(SMALL["steering"], share_lower_layers=False)
CONFIGS["steering_full_forward"] = CONFIGS["steering"]
COMPARED_WITH = {"steering_one_pass": "steering",  # their final vectors are compared with steering's first run
                 "steering_full_forward": "steering"}


def method_files(method: str, model_dir: str, folder: Path) -> dict:
    """What a method needs beside the policy, built for the random model: the oracle's starting
    adapter; a random SARM with a human-latent buffer (so the discriminator trains too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "oracle":
        from modules.models.adapters import LoRAPolicy

        lora = LoRAPolicy(AutoModelForCausalLM.from_pretrained(model_dir), r=16)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, param in lora.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        return {"adapter_path": str(lora.save(folder / "oracle_adapter"))}
    if method == "sarm":
        from modules.sarm.human_latents import build_human_latents, save_human_latents
        from modules.sarm.model import SARMRewardModel
        from modules.sarm.random_sarm import write_random_sarm

        tok = AutoTokenizer.from_pretrained(model_dir)
        sarm = write_random_sarm(folder / "sarm", hidden_size=256, layers=2, latent_size=2048, k=32, tokenizer=tok)
        demos = folder / "demos.jsonl"
        demos.write_text("\n".join(json.dumps({"prompt": f"Is claim {i} right?", "response": "Not quite; here is why."})
                                   for i in range(16)))
        human = save_human_latents(build_human_latents(SARMRewardModel.load(str(sarm), device="cpu"), str(demos)),
                                   folder / "human.pt")
        return {"reward": {"class_path": "modules.sarm.reward.SARMReward",
                           "init_args": {"model": str(sarm), "penalize_features": [1115], "tau_values": [0.0],
                                         "alpha_values": [1.0], "kl_beta": 0.1, "human_latents": str(human),
                                         "disc_batch_size": 8}}}
    return {}


def build_model(tokenizer: str, folder: Path, hidden: int, layers: int) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, vocab_size=len(tok),
                         max_position_embeddings=2048, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_config(method: str, model_dir: str, folder: Path, updates: int, args, files: dict) -> Path:
    method = method.split("#")[0]
    config = yaml.safe_load((ROOT / CONFIGS[method]).read_text())
    init = config["model"]["init_args"]
    init.update(model=model_dir, dtype=args.dtype, total_updates=updates, **SMALL[method], **files)
    if "hook_layer" in init:
        init["hook_layer"] = args.layers // 2
    keep = ("callbacks.judge_batching.JudgeBatching",)
    config["trainer"].update(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
                             enable_progress_bar=False,
                             callbacks=[{"class_path": "callbacks.checkpoints.EvenlySpacedCheckpoint",
                                         "init_args": {"num_checkpoints": updates}}]
                             + [c for c in config["trainer"].get("callbacks", []) if c["class_path"] in keep])
    config.update(output_dir=str(folder / "runs"), run_name="r")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, timeout_s: float, *extra: str, log: Path | None = None) -> tuple[bool, str, float]:
    """One ``cli.py fit`` in its own process group; past ``timeout_s`` every process of it (the other
    ranks too) gets SIGABRT, so that faulthandler prints where each one was stuck, then SIGKILL."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "cli.py", "fit", "--config", str(config), *extra], cwd=ROOT,
                                   env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            for sig in (signal.SIGABRT, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
                time.sleep(5)
            code = process.wait()
        err.seek(0)
        stderr = err.read()
    lines = [line for line in stderr.splitlines() if line.strip()]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("\n".join(lines[-400:]) + "\n")
    if hung:  # the innermost frames of each process's main thread
        stuck, block = [], None
        for line in lines:
            if line.startswith("Current thread"):
                block = []
            elif block is not None and line.strip().startswith("File ") and len(block) < 3:
                block.append(line.strip().split(", line")[0].split("/")[-1] + ":" + line.split("in ")[-1])
                if len(block) == 3:
                    stuck.append(" < ".join(block))
                    block = None
        return False, f"ran over {timeout_s:.0f} s; stuck at: " + " || ".join(stuck), time.perf_counter() - started
    error = next((line for line in reversed(lines) if "Error" in line or line.startswith("error")),
                 lines[-1] if lines else "")
    return code == 0, error[-300:], time.perf_counter() - started


def run_stats(run: Path) -> dict:
    with open(run / "metrics.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r.get("reward/mean")]
    times = [float(r["time/rollout_batch_s"]) for r in rows[1:] if r.get("time/rollout_batch_s")]
    peaks = [float(r["memory/peak_gib"]) for r in rows if r.get("memory/peak_gib")]
    # update 1 starts from the same weights under every strategy: equal rollouts (reward) must give the
    # same gradient norm, whoever holds the gradients (a lost or doubled chunk shows here first)
    norm_key = next((k for k in (rows[0] if rows else {}) if k.endswith("grad_norm")), None)
    first = {"update1_reward": float(rows[0]["reward/mean"]) if rows else None,
             "update1_grad_norm": float(rows[0][norm_key]) if norm_key and rows[0][norm_key] else None}
    return {"s_per_update": sum(times) / len(times) if times else None, "peak_gib": max(peaks) if peaks else None,
            **first}


def export_difference(a: Path, b: Path) -> float | None:
    import torch
    from safetensors.torch import load_file

    def tensors(run: Path) -> dict:
        if (run / "steering_vector.pt").exists():
            payload = torch.load(run / "steering_vector.pt", weights_only=True)
            return {"v": payload["v"], "alpha": payload["alpha"]}
        out = {f"lora.{k}": v for k, v in load_file(str(run / "adapter" / "adapter_model.safetensors")).items()}
        if (run / "adapter" / "value_head.pt").exists():
            out.update({f"value.{k}": v for k, v in
                        torch.load(run / "adapter" / "value_head.pt", weights_only=True).items()})
        return out

    try:
        ta, tb = tensors(a), tensors(b)
    except (OSError, RuntimeError, KeyError):
        return None
    if ta.keys() != tb.keys():
        return float("inf")
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def main() -> None:
    from modules.options import REQUIRED, add_options

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, tokenizer=REQUIRED, dtype="bfloat16",
                notes={"tokenizer": "for the random-weight model"})
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--methods", default="steering,ppo")
    parser.add_argument("--strategies", default="ddp,deepspeed_stage_2,fsdp,deepspeed_stage_3")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--timeout_s", type=float, default=150)
    parser.add_argument("--budget_s", type=float, default=500)
    parser.add_argument("--out", default="strategies.json")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--accelerator", default="gpu", help="cpu for a smoke test of the script")
    parser.add_argument("--logs", default=None, help="A folder for each run's stderr (last 400 lines).")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-resume: time and memory only (no second run from a checkpoint)")
    parser.add_argument("--cells", default=None,
                        help="method:strategy,... to run in this order (instead of methods x strategies); "
                             "method#2 runs a method again in a folder of its own")
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="strategies_"))
    model_dir = build_model(args.tokenizer, work / "model", args.hidden, args.layers)
    cells = [(s, m) for s in args.strategies.split(",") for m in args.methods.split(",")]
    if args.cells:
        cells = [tuple(reversed(cell.split(":"))) for cell in args.cells.split(",")]
    files = {m: method_files(m.split("#")[0], model_dir, work) for m in sorted({m for _, m in cells})}
    results = []
    first: dict[str, tuple[Path, str]] = {}  # method -> run folder and name of its first strategy that trained
    print(f"{'method':<9} {'strategy':<19} {'train':<5} {'s/update':>8} {'peak GiB/GPU':>12} "
          f"{'resume max|diff|':>16} {'vs first':>9} {'u1 reward':>10} {'u1 |grad|':>10}  note",
          flush=True)
    for strategy, method in cells:
        row = {"method": method, "strategy": strategy, "devices": args.devices}
        if time.perf_counter() - started > args.budget_s:
            row["status"] = "not run (budget)"
            results.append(row)
            print(f"{method:<9} {strategy:<19} not run (budget)", flush=True)
            continue
        folder = work / f"{method}_{strategy}"
        args.strategy = strategy
        config = write_config(method, model_dir, folder / "straight", args.updates, args, files[method])
        logs = Path(args.logs) if args.logs else None
        ok, error, seconds = fit(config, args.timeout_s, log=logs / f"{method}_{strategy}.log" if logs else None)
        row.update(status="ok" if ok else "fail", seconds=round(seconds, 1), note="" if ok else error)
        base = method.split("#")[0]  # "ppo#2": ppo run again (run-to-run determinism)
        twin_of = COMPARED_WITH.get(base)
        if ok:
            straight = folder / "straight" / "runs" / "r"
            row.update(run_stats(straight))
        if ok and twin_of:  # a one-pass twin: compared with its two-pass run, not resumed
            row["vs_first_max_abs_diff"] = export_difference(first[twin_of][0], straight) if twin_of in first else None
            row["first_strategy"] = first[twin_of][1] if twin_of in first else None
        elif ok and args.resume:
            resume_config = write_config(method, model_dir, folder / "resumed", args.updates, args, files[method])
            checkpoint = straight / "checkpoints" / f"update{args.updates - 1:06d}.ckpt"
            ok, error, _ = fit(resume_config, args.timeout_s, "--ckpt_path", str(checkpoint),
                               log=logs / f"{method}_{strategy}_resume.log" if logs else None)
            row["resume_max_abs_diff"] = export_difference(straight, folder / "resumed" / "runs" / "r") if ok else None
            if not ok:
                row["note"] = f"resume: {error}"
            if base in first:
                row["vs_first_max_abs_diff"] = export_difference(first[base][0], straight)
                row["first_strategy"] = first[base][1]
            else:
                first[base] = (straight, strategy)
        results.append(row)
        fmt = lambda v, f: format(v, f) if isinstance(v, float) else "-"  # noqa: E731
        print(f"{method:<9} {strategy:<19} {row['status']:<5} {fmt(row.get('s_per_update'), '8.2f')} "
              f"{fmt(row.get('peak_gib'), '12.2f')} {fmt(row.get('resume_max_abs_diff'), '16.3g')} "
              f"{fmt(row.get('vs_first_max_abs_diff'), '9.3g')} {fmt(row.get('update1_reward'), '10.5f')} "
              f"{fmt(row.get('update1_grad_norm'), '10.5g')}  "
              f"{row.get('note', '')}",
              flush=True)
        Path(args.out).write_text(json.dumps({"devices": args.devices, "updates": args.updates, "results": results},
                                             indent=2))  # after every cell: a killed run keeps what it measured
    Path(args.out).write_text(json.dumps({"devices": args.devices, "updates": args.updates, "results": results},
                                         indent=2))


if __name__ == "__main__":
    main()
