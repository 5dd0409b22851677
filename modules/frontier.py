"""The reward-vs-KL frontier of a held-out comparison (:class:`modules.evaluation.Comparison`).

One panel per judge (the evaluation judge first): x is the exact KL to the unsteered model per
reply token, y the arm's reward minus the reference arm's, with its paired standard error. The
arms of one method at several scales are one curve, starting at the reference point (0, 0);
a method with one arm is a labelled point. Filled markers keep replies at least
``min_length_ratio`` as long as the reference's; hollow ones do not.
"""

from __future__ import annotations

from pathlib import Path

from modules.files import save_figure_atomically


def frontier_points(comparison: dict, reward: str) -> dict[str, list[dict]]:
    """Method -> its arms as points {x, y, err, scale, name, length_ratio}, ordered by scale."""
    methods: dict[str, list[dict]] = {}
    for arm in comparison["arms"]:
        if arm.get("reference"):
            continue
        r = arm["rewards"][reward]
        methods.setdefault(arm["method"], []).append(
            {"x": arm["kl_per_token"], "y": r["difference"], "err": r["paired_se"], "scale": arm["scale"],
             "name": arm["name"], "length_ratio": arm["length_ratio"]})
    for points in methods.values():
        points.sort(key=lambda p: (p["scale"] is None, p["scale"] or 0.0, p["x"]))
    return methods


def plot_frontier(comparison: dict, path: str | Path, min_length_ratio: float = 0.9, title: str | None = None) -> Path | None:
    """Draw the frontier into ``path`` (PNG); one line and None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("frontier plot skipped: matplotlib is not installed (pip install matplotlib)", flush=True)
        return None
    rewards = sorted(comparison["rewards"], key=lambda name: name != "evaluation")
    fig, axes = plt.subplots(1, len(rewards), figsize=(6.2 * len(rewards), 4.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, reward in zip(axes[0], rewards):
        methods = frontier_points(comparison, reward)
        for k, (method, points) in enumerate(methods.items()):
            color = colors[k % len(colors)]
            if len(points) > 1:
                ax.plot([0.0] + [p["x"] for p in points], [0.0] + [p["y"] for p in points], color=color,
                        linewidth=1.2, label=method)
            for p in points:
                kept = p["length_ratio"] >= min_length_ratio
                ax.errorbar(p["x"], p["y"], yerr=p["err"], fmt="o", color=color, mfc=color if kept else "white",
                            capsize=2, label=method if len(points) == 1 else None)
                text = p["name"] if len(points) == 1 else f"×{p['scale']:g}"
                ax.annotate(text, (p["x"], p["y"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.plot([0.0], [0.0], "ks", markersize=4)
        ax.set_xlabel("KL to the unsteered model (nats per reply token)")
        ax.set_ylabel(f"reward − vector off ({reward} judge, ± paired SE)")
        ax.set_title(f"{reward} judge", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    n = comparison["samples_per_arm"]
    fig.suptitle(title or f"held-out reward vs KL, {n} paired samples per arm (hollow: replies < "
                 f"{min_length_ratio:.0%} of unsteered length)", fontsize=10)
    fig.tight_layout()
    save_figure_atomically(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
