"""Training curves for a person to look at: sparklines in the terminal and ``curves.png``.

The callback keeps the per-update history of a few metrics (restored on resume, since it is part
of the checkpoint), prints one sparkline per metric when training ends and, where matplotlib is
installed, draws them into ``<run_dir>/curves.png``. The full metric history is in the loggers
(``metrics.csv``, TensorBoard, W&B).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from modules.files import save_figure_atomically

_BARS = "▁▂▃▄▅▆▇█"
DEFAULT_METRICS = ("reward/mean", "reward/ema", "kl/token", "response/length", "judge/failed")


def sparkline(values: list[float], width: int = 60) -> str:
    """One line of block characters for ``values`` (resampled to at most ``width`` points)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    return "".join(" " if not math.isfinite(v) else _BARS[min(7, int((v - low) / span * 7.999))] for v in values)


class TrainingCurves(L.Callback):
    """Plot reward, KL, reply length and steering norm over updates.

    Args:
        metrics: Names of logged metrics to plot.
        png: Also write ``curves.png`` into the run folder (needs matplotlib).
    """

    def __init__(self, metrics: list[str] | None = None, png: bool = True):
        self.metrics = list(metrics) if metrics is not None else []
        self.png = png
        self.history: dict[str, list[float]] = {m: [] for m in self.metrics}
        self.steps: list[int] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.metrics:  # the method's own choice, else the common ones
            self.metrics = list(getattr(pl_module, "curve_metrics", DEFAULT_METRICS))
        for name in self.metrics:
            self.history.setdefault(name, [])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        self.steps.append(pl_module.rollout_batches_done)
        for name in self.metrics:
            value = logged.get(name)
            self.history[name].append(float(value) if value is not None else float("nan"))

    def state_dict(self) -> dict:
        return {"history": self.history, "steps": self.steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {m: list(v) for m, v in state_dict.get("history", {}).items()}
        self.steps = list(state_dict.get("steps", []))

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.steps:
            return
        print(f"\ntraining curves over {len(self.steps)} updates (first → last):")
        width = max([18, *(len(name) for name in self.metrics)])
        for name in self.metrics:
            values = self.history.get(name, [])
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                print(f"  {name:<{width}} {values[0]:>9.4f} {sparkline(values)} {values[-1]:.4f}")
        if self.png:
            self._write_png(Path(trainer.default_root_dir) / "curves.png")

    def _write_png(self, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("  curves.png skipped: matplotlib is not installed (pip install matplotlib)", flush=True)
            return
        shown = [m for m in self.metrics if any(math.isfinite(v) for v in self.history.get(m, []))]
        if not shown:
            return
        fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.0 * len(shown)), sharex=True)
        for ax, name in zip([axes] if len(shown) == 1 else axes, shown):
            ax.plot(self.steps, self.history[name], marker=".", linewidth=1)
            ax.set_ylabel(name, fontsize=8)
            ax.grid(alpha=0.3)
        fig.axes[-1].set_xlabel("update")
        fig.tight_layout()
        save_figure_atomically(fig, path, dpi=110)
        plt.close(fig)
        print(f"  curves written to {path}")
