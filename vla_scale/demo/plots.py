"""The demo's and the ablation's pictures: loss curves per source, success by suite with intervals.

Only matplotlib's Agg backend; every function writes one PNG and returns its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def loss_curves(metrics: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "training loss per source",
                vlm_curve: Sequence[float] | None = None) -> Path:
    """Per-source training loss (`loss/<source>`) against step, one line per source; validation losses
    (`val/loss/<source>`) as markers; the source VLM's own stage (answer loss) in a panel beside it."""
    plt = _plt()
    panels = 2 if vlm_curve else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    sources = sorted({k.split("/", 1)[1] for m in metrics for k in m if k.startswith("loss/")})
    for s in sources:
        pts = [(m["step"], m[f"loss/{s}"]) for m in metrics if f"loss/{s}" in m]
        if pts:
            ax.plot(*zip(*pts), label=s, lw=1.2)
        val = [(m["step"], m[f"val/loss/{s}"]) for m in metrics if f"val/loss/{s}" in m]
        if val:
            ax.plot(*zip(*val), "o", ms=5, color=ax.lines[-1].get_color() if pts else None, label=f"{s} (held out)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    if vlm_curve:
        ax = axes[0][1]
        c = np.asarray(vlm_curve, dtype=float)
        w = max(1, len(c) // 50)
        smooth = np.convolve(c, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w, smooth, color="#8172b2", lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("source VLM stage: scene questions (answer loss)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def success_by_suite(rows: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path, *,
                     title: str = "success by suite (Wilson 95%)") -> Path:
    """Grouped bars: for each suite (x), one bar per policy, with its Wilson interval.
    `rows[policy][suite]` is a summary cell (`rate`, `ci95`)."""
    plt = _plt()
    policies = list(rows)
    suites = list(dict.fromkeys(s for p in policies for s in rows[p]))
    width = 0.8 / max(1, len(policies))
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(suites) * max(1, len(policies)) / 2, 3.8))
    for k, p in enumerate(policies):
        x = np.arange(len(suites)) + (k - (len(policies) - 1) / 2) * width
        rates = np.array([rows[p].get(s, {}).get("rate", np.nan) for s in suites])
        lo = np.array([rows[p].get(s, {}).get("ci95", [np.nan, np.nan])[0] for s in suites])
        hi = np.array([rows[p].get(s, {}).get("ci95", [np.nan, np.nan])[1] for s in suites])
        ax.bar(x, np.nan_to_num(rates), width, label=p,
               yerr=[np.nan_to_num(np.maximum(rates - lo, 0)), np.nan_to_num(np.maximum(hi - rates, 0))], capsize=3)
    ax.set_xticks(range(len(suites)), suites, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
