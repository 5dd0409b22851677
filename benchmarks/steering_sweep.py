"""Train one point of the embedded default's sweep: the YAML's model options + overrides.

    OMP_NUM_THREADS=1 python benchmarks/steering_sweep.py --name lr04_kl02 --set lr=0.04 kl_coef=0.2

Trains SteeringVectorRL as ``configs/steering_rl_smollm2.yaml`` would (same model, judge, seed,
prompt schedule, JudgeBatching), without the held-out callback, and writes
``<out>/<name>/steering_vector.pt`` and ``<out>/<name>/train.json`` (options, wall time, the
per-update reward/KL/length). The vectors are then compared on one set of held-out prompts and
seeds by ``python cli.py evaluate --files ...`` (one shared vector-off arm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", nargs="*", default=[], help="key=value model options (JSON values)")
    parser.add_argument("--config", default=str(ROOT / "configs/steering_rl_smollm2.yaml"))
    parser.add_argument("--out", default=str(ROOT / "steering_runs/sweep"))
    args = parser.parse_args()

    import lightning as L
    import torch

    from callbacks.judge_batching import JudgeBatching
    from datamodules.prompts import PromptDataModule
    from modules.judges.local import LocalJudge
    from modules.steering_rl import SteeringVectorRL

    config = yaml.safe_load(Path(args.config).read_text())
    options = dict(config["model"]["init_args"])
    judge_args = options.pop("judge")["init_args"]
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    options.update(overrides)
    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.get("seed_everything", 0))
    started = time.perf_counter()
    module = SteeringVectorRL(judge=LocalJudge(**judge_args), **options)
    data = PromptDataModule(**config["data"]["init_args"], prompts_per_update=module.prompts_per_update)
    history: list[dict] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            history.append({k: float(m[k]) for k in ("reward/mean", "kl/token", "response/length",
                                                     "steer/delta_norm") if k in m})
            print(f"[{args.name}] update {len(history)}: " + ", ".join(f"{k}={v:.4f}" for k, v in history[-1].items()),
                  flush=True)

    trainer = L.Trainer(max_epochs=-1, default_root_dir=str(out), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[JudgeBatching(), Record()])
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    module.export_portable(out / "steering_vector.pt")
    summary = {"name": args.name, "overrides": overrides, "seconds": seconds, "threads": torch.get_num_threads(),
               "load_1min": os.getloadavg()[0], "history": history}
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    print(f"[{args.name}] done in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
