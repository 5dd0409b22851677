"""Calibration of the oracle's stated confidence against the judge's informativeness (pure functions).

Confidence ``c = X / 10`` (X the integer in ``[epistemic status: X]``); informativeness ``i`` in
[0, 1] from the judge. Every function takes the samples that parsed and were judged (pass a mask
or filter first).

- :func:`brier_score`: ``mean((c - i)^2)``. With a graded ``i`` this is the Brier score against a
  soft target (it equals the usual Brier score when ``i`` is 0 or 1).
- :func:`calibration_summary`: mean confidence, mean informativeness, their gap, the Brier score.
- :func:`reliability_table`: samples binned by confidence (by default one bin per X value, 0..10),
  each bin's count, mean confidence and mean informativeness; :func:`expected_calibration_error`
  is the count-weighted mean of ``|mean c - mean i|`` over bins.
- :func:`reliability_diagram`: the table as a PNG (needs matplotlib; without it, one line says it
  was skipped and the function returns False).

Departure from the usual definitions: 1. the target is a graded informativeness in [0, 1], not a
0/1 outcome, so "Brier" and "ECE" here are their soft-target forms (equal to the usual ones for
0/1 targets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from modules.files import save_figure_atomically


def _as_tensors(confidence, informativeness, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    i = torch.as_tensor(informativeness, dtype=torch.float64).flatten()
    if mask is not None:
        keep = torch.as_tensor(mask, dtype=torch.bool).flatten()
        c, i = c[keep], i[keep]
    return c, i


def brier_score(confidence, informativeness, mask=None) -> float:
    """``mean((c - i)^2)`` over the (masked) samples; NaN when there are none."""
    c, i = _as_tensors(confidence, informativeness, mask)
    return float(((c - i) ** 2).mean()) if c.numel() else float("nan")


def calibration_summary(confidence, informativeness, mask=None) -> dict[str, float]:
    """Mean confidence vs mean informativeness, their gap (over-confidence when > 0), Brier, count."""
    c, i = _as_tensors(confidence, informativeness, mask)
    n = c.numel()
    mean_c = float(c.mean()) if n else float("nan")
    mean_i = float(i.mean()) if n else float("nan")
    return {"mean_confidence": mean_c, "mean_informativeness": mean_i, "overconfidence": mean_c - mean_i,
            "brier": brier_score(c, i), "count": float(n)}


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    count: int
    mean_confidence: float
    mean_informativeness: float


def confidence_bins(num_bins: int | None = None) -> list[tuple[float, float]]:
    """``None``: one bin per X (centred on X/10); else ``num_bins`` equal bins over [0, 1]."""
    if num_bins is None:
        return [(max(x / 10 - 0.05, 0.0), min(x / 10 + 0.05, 1.0)) for x in range(11)]
    return [(k / num_bins, (k + 1) / num_bins) for k in range(num_bins)]


def reliability_table(confidence, informativeness, mask=None, num_bins: int | None = None) -> list[ReliabilityBin]:
    """Samples binned by confidence (each sample in exactly one bin; the last bin is closed)."""
    c, i = _as_tensors(confidence, informativeness, mask)
    bins = confidence_bins(num_bins)
    out = []
    for k, (low, high) in enumerate(bins):
        last = k == len(bins) - 1
        inside = (c >= low - 1e-9) & ((c <= high + 1e-9) if last else (c < high - 1e-9))
        n = int(inside.sum())
        out.append(ReliabilityBin(low, high, n, float(c[inside].mean()) if n else float("nan"),
                                  float(i[inside].mean()) if n else float("nan")))
    return out


def expected_calibration_error(table: Sequence[ReliabilityBin]) -> float:
    total = sum(b.count for b in table)
    if not total:
        return float("nan")
    return sum(b.count * abs(b.mean_confidence - b.mean_informativeness) for b in table if b.count) / total


def format_reliability_table(table: Sequence[ReliabilityBin]) -> str:
    """A small text table (for reports and logs)."""
    lines = ["  confidence      n   mean conf   mean inform"]
    for b in table:
        if b.count:
            lines.append(f"  {b.low:4.2f}-{b.high:4.2f}  {b.count:5d}   {b.mean_confidence:9.3f}   "
                         f"{b.mean_informativeness:11.3f}")
    lines.append(f"  ECE {expected_calibration_error(table):.4f}")
    return "\n".join(lines)


def table_as_dicts(table: Sequence[ReliabilityBin]) -> list[dict]:
    return [asdict(b) for b in table]


def reliability_diagram(table: Sequence[ReliabilityBin], path: str | Path, title: str = "") -> bool:
    """Write the reliability diagram as a PNG; False (and one line printed) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[oracle] reliability diagram skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    used = [b for b in table if b.count]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    if used:
        centres = [(b.low + b.high) / 2 for b in used]
        widths = [b.high - b.low for b in used]
        ax.bar(centres, [b.mean_informativeness for b in used], width=widths, alpha=0.6, edgecolor="black",
               label="mean informativeness")
        ax.scatter([b.mean_confidence for b in used], [b.mean_informativeness for b in used], s=12, color="black")
        for x, b in zip(centres, used):
            ax.annotate(str(b.count), (x, min(b.mean_informativeness + 0.02, 0.97)), ha="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="stated confidence X/10", ylabel="judged informativeness",
           title=title or f"reliability (ECE {expected_calibration_error(table):.3f})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure_atomically(fig, path, dpi=100)
    plt.close(fig)
    return True
