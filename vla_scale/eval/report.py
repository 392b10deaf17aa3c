"""Evaluation reports: JSON (the record), Markdown (to read), a PNG bar chart with the Wilson
intervals, and GIFs of a few rollouts.

The folder is written next to its final place and renamed into it when
complete, so an interrupted evaluation never leaves a half report, and an
existing report is replaced only when asked (`overwrite=True`).

`report.json` follows `REPORT_SCHEMA` (JSON Schema, draft 2020-12):
`meta` (backend, suite, variants, policy, seeds, episodes, envs, versions),
`summary` (`metrics.summarize`), `timing`, `episodes` (one record per
episode: task, variant, seed, index, success, steps, instruction,
env_seconds) and `files` (the chart and the GIFs, relative paths).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vla_scale.errors import ConfigError
from vla_scale.eval.metrics import summarize

REPORT_VERSION = 1
GIF_STRIDE = 2  # keep every 2nd control step: 50 Hz control -> 25 fps, real time
_CELL = {"type": "object", "required": ["n", "successes", "rate", "ci95", "mean_steps", "mean_steps_success"],
         "properties": {"n": {"type": "integer", "minimum": 0}, "successes": {"type": "integer", "minimum": 0},
                        "rate": {"type": "number", "minimum": 0, "maximum": 1},
                        "ci95": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                                 "minItems": 2, "maxItems": 2},
                        "mean_steps": {"type": "number", "minimum": 0},
                        "mean_steps_success": {"type": ["number", "null"]}}}
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["version", "meta", "summary", "timing", "episodes", "files"],
    "properties": {
        "version": {"const": REPORT_VERSION},
        "meta": {"type": "object",
                 "required": ["backend", "suite", "variants", "policy", "seed", "episodes_per_cell", "envs",
                              "tasks"],
                 "properties": {"backend": {"type": "string"}, "suite": {"type": "string"},
                                "variants": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                "tasks": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                "policy": {"type": "string"}, "seed": {"type": "integer"},
                                "episodes_per_cell": {"type": "integer", "minimum": 1},
                                "envs": {"type": "integer", "minimum": 1}}},
        "summary": {"type": "object", "required": ["overall", "variants", "tasks"],
                    "properties": {
                        "overall": {"allOf": [_CELL, {"type": "object", "required": ["variant_mean"]}]},
                        "variants": {"type": "object", "additionalProperties": _CELL},
                        "tasks": {"type": "object", "additionalProperties": {
                            "allOf": [_CELL, {"type": "object", "required": ["variant_mean", "variants"],
                                              "properties": {"variants": {"type": "object",
                                                                          "additionalProperties": _CELL}}}]}}}},
        "timing": {"type": "object", "required": ["wall_seconds", "policy_seconds", "env_steps"]},
        "episodes": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["task", "variant", "seed", "index", "success", "steps", "instruction", "env_seconds"],
            "properties": {"task": {"type": "string"}, "variant": {"type": "string"}, "seed": {"type": "integer"},
                           "index": {"type": "integer"}, "success": {"type": "boolean"},
                           "steps": {"type": "integer", "minimum": 0}, "instruction": {"type": "string"},
                           "env_seconds": {"type": "number"}}}},
        "files": {"type": "object", "required": ["chart", "gifs"],
                  "properties": {"chart": {"type": "string"},
                                 "gifs": {"type": "array", "items": {"type": "string"}}}},
    },
}


def _pct(c: dict[str, Any]) -> str:
    lo, hi = c["ci95"]
    return f"{100 * c['rate']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] ({c['successes']}/{c['n']})"


def markdown(report: dict[str, Any]) -> str:
    meta, s = report["meta"], report["summary"]
    variants = meta["variants"]
    lines = [f"# Evaluation: {meta['policy']} on {meta['backend']} / {meta['suite']}", "",
             f"{meta['episodes_per_cell']} episodes per task and variant, seeds from {meta['seed']}, "
             f"{meta['envs']} environment process(es). Success rate with its Wilson 95% interval "
             f"(successes/episodes).", ""]
    if len(variants) > 1:
        lines += ["| task | " + " | ".join(variants) + " | variant mean | pooled |",
                  "|---" * (len(variants) + 3) + "|"]
        for task, t in s["tasks"].items():
            cells = [_pct(t["variants"][v]) if v in t["variants"] else "-" for v in variants]
            lines.append(f"| {task} | " + " | ".join(cells) + f" | {100 * t['variant_mean']:.0f}% | {_pct(t)} |")
        o = s["overall"]
        lines.append("| **all** | " + " | ".join(_pct(s["variants"][v]) for v in variants)
                     + f" | **{100 * o['variant_mean']:.0f}%** | {_pct(o)} |")
    else:
        lines += ["| task | success | mean steps | mean steps (successes) |", "|---|---|---|---|"]
        for task, t in {**s["tasks"], "**all**": s["overall"]}.items():
            won = t["mean_steps_success"]
            lines.append(f"| {task} | {_pct(t)} | {t['mean_steps']:.0f} | {'-' if won is None else f'{won:.0f}'} |")
    timing = report["timing"]
    lines += ["", f"Time: {timing['wall_seconds']:.1f} s wall, {timing['policy_seconds']:.1f} s in the policy, "
                  f"{timing['env_steps']} environment steps.", "", f"![success]({report['files']['chart']})", ""]
    if report["files"]["gifs"]:
        lines += ["Rollouts:", ""] + [f"- [{Path(g).stem}]({g})" for g in report["files"]["gifs"]]
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any], path: Path) -> None:
    """Success per task (and per variant, when there are several), each bar with its Wilson 95% interval."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    s, meta = report["summary"], report["meta"]
    panels = [("per task", {**s["tasks"], "all": s["overall"]})]
    if len(meta["variants"]) > 1:
        panels.append(("per variant (all tasks)", s["variants"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 3.6), squeeze=False)
    for ax, (title, cells) in zip(axes[0], panels):
        names = list(cells)
        rates = np.array([cells[n]["rate"] for n in names])
        lo = np.array([cells[n]["ci95"][0] for n in names])
        hi = np.array([cells[n]["ci95"][1] for n in names])
        colours = ["#4c72b0"] * (len(names) - 1) + ["#dd8452"] if title == "per task" else ["#55a868"] * len(names)
        ax.bar(range(len(names)), rates, color=colours, yerr=[np.maximum(rates - lo, 0), np.maximum(hi - rates, 0)], capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("success rate")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{meta['policy']} - {meta['backend']}/{meta['suite']} (Wilson 95%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_gif(frames: Sequence[np.ndarray], path: Path, stride: int = GIF_STRIDE) -> None:
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in list(frames)[::stride]]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // 25, loop=0, optimize=False)


def write_report(out: str | Path, *, meta: dict[str, Any], results: Sequence[Any], timing: dict[str, Any],
                 overwrite: bool = False) -> Path:
    """Write report.json, report.md, success.png and gifs/ into `out` (atomically: see the module doc)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if not results:
        raise ConfigError("no episodes were run: nothing to report")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the report is an ordinary folder
    try:
        gifs = []
        for r in results:
            if r.frames:
                rel = f"gifs/{r.task}__{r.variant}__{r.index}_{'success' if r.success else 'failure'}.gif"
                (tmp / "gifs").mkdir(exist_ok=True)
                write_gif(r.frames, tmp / rel)
                gifs.append(rel)
        report = {"version": REPORT_VERSION, "meta": meta,
                  "summary": summarize(results, meta["variants"]), "timing": timing,
                  "episodes": [r.to_dict() for r in results], "files": {"chart": "success.png", "gifs": gifs}}
        bar_chart(report, tmp / "success.png")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(markdown(report))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "report")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
