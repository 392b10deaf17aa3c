"""`vla-scale profile`: a short training job that shows where the time of a step goes.

    run_profile(cfg, steps=N, out=DIR)      # any strategy; every rank of a torchrun job calls it

runs the ordinary `Trainer` for N steps in a scratch run folder (`DIR/run`,
never the user's checkpoints), with `train.log_every=1` and
`train.sync_timing=true` (the GPU is synchronized around each timed phase, so
the breakdown is device time), and writes into DIR:

- `summary.json` and `summary.txt` (also printed): throughput, MFU, the mean
  step-time breakdown and peak memory over the measured steps (every step but
  the first, which pays for allocation and warm-up; see `ThroughputMeter`);
- `trace_rank<R>.json`: a Chrome trace (chrome://tracing, Perfetto) of a few
  steps from `torch.profiler` with a schedule (`wait` steps skipped, `warmup`
  steps profiled and discarded, `active` steps recorded); the strategies
  mark their phases as `vla_scale/forward`, `vla_scale/backward`,
  `vla_scale/optimizer`, `vla_scale/comm`; every rank writes its own;
- `breakdown.png`: the step-time breakdown per step (stacked) and tokens/s
  over the steps.

Every number comes from the trainer's own log (`DIR/run/metrics.jsonl`), so
the profile reports exactly what a training run logs; the summary's rates are
totals over totals (all measured tokens / all measured wall time), not means
of per-step rates. Only rank 0 writes the summary and the chart.

The profiler's own overhead (and the synchronization) slows the profiled
steps a little: compare configurations with the same profile settings.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from vla_scale.config import Config
from vla_scale.errors import ConfigError
from vla_scale.train.metrics import read_metrics

# Phases that add up to a step's wall time, in the order they are drawn; "comm" overlaps them.
ADDITIVE_PHASES = ("data", "forward", "backward", "optimizer", "checkpoint", "other")
OVERLAPPING_PHASES = ("comm",)


def profile_config(cfg: Config, steps: int, out: Path) -> Config:
    """`cfg` for a profile run: N steps into `out/run`, logged every step, phases device-timed."""
    train = dataclasses.replace(cfg.train, steps=steps, log_every=1, sync_timing=True, progress=False,
                                warmup_steps=min(cfg.train.warmup_steps, steps))
    run = dataclasses.replace(cfg.run, output_dir=str(out / "run"))
    return dataclasses.replace(cfg, train=train, run=run)


def run_profile(cfg: Config, steps: int, out: str | Path, *, wait: int = 1, warmup: int = 1,
                active: int = 2) -> dict[str, Any] | None:
    """Profile `steps` training steps of `cfg` into `out`; returns the summary on rank 0 (None elsewhere)."""
    from vla_scale.train.trainer import Trainer

    if min(wait, warmup) < 0 or active < 1:
        raise ConfigError(f"profile schedule: wait={wait} and warmup={warmup} must be >= 0 and active={active} >= 1")
    if steps < max(wait + warmup + active, 3):
        raise ConfigError(f"--steps {steps} is too few: the trace needs wait + warmup + active = "
                          f"{wait + warmup + active} steps and throughput at least 3 (the first is warm-up)")
    out = Path(out)
    trainer = Trainer(profile_config(cfg, steps, out))
    rank = trainer.strategy.rank
    trace = out / f"trace_rank{rank}.json"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out.mkdir(parents=True, exist_ok=True)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=lambda prof: prof.export_chrome_trace(str(trace)),
    )
    trainer.step_callbacks.append(lambda step, result: profiler.step())
    with profiler:
        trainer.fit(resume="none")
    strategy = trainer.strategy
    strategy.barrier()  # every rank's trace is written (at the end of its active steps)
    strategy.close()
    if not strategy.is_main:
        return None
    rows = read_metrics(trainer.run_dir)
    summary = summarize(rows)
    summary.update({"strategy": cfg.train.strategy, "world_size": strategy.world_size,
                    "device": _device_name(strategy.device), "steps": steps,
                    "schedule": {"wait": wait, "warmup": warmup, "active": active},
                    "traces": sorted(p.name for p in out.glob("trace_rank*.json")), "run_dir": str(trainer.run_dir)})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = format_summary(summary)
    (out / "summary.txt").write_text(table + "\n")
    print(table, flush=True)
    plot_breakdown(rows, out / "breakdown.png")
    return summary


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the logged windows of a metrics.jsonl: rates = all tokens / all wall time."""
    windows = [r for r in rows if r.get("perf/window_s")]
    if not windows:
        raise ConfigError("the profile run logged no throughput (it needs at least 2 steps)")
    seconds = sum(r["perf/window_s"] for r in windows)
    steps = sum(r["perf/window_steps"] for r in windows)
    # Each window's counts, recovered from its rates and wall time.
    tokens = sum(r["perf/tokens_per_s"] * r["perf/window_s"] for r in windows)
    samples = sum(r["perf/samples_per_s"] * r["perf/window_s"] for r in windows)
    per_device = windows[-1]["perf/tokens_per_s"] / windows[-1]["perf/tokens_per_s_per_device"]
    summary: dict[str, Any] = {
        "measured_steps": int(steps), "first_measured_step": int(windows[0]["step"] - windows[0]["perf/window_steps"] + 1),
        "wall_s": seconds, "step_time_s": seconds / steps,
        "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_device": tokens / seconds / per_device, "devices": int(round(per_device)),
        "mfu": (sum(r["perf/mfu"] * r["perf/window_s"] for r in windows) / seconds
                if all(r.get("perf/mfu") is not None for r in windows) else None),
        "breakdown_s": {},
    }
    for phase in (*ADDITIVE_PHASES, *OVERLAPPING_PHASES):
        key = f"perf/time/{phase}_s"
        if any(key in r for r in windows):
            summary["breakdown_s"][phase] = sum(r.get(key, 0.0) * r["perf/window_steps"] for r in windows) / steps
    memory = {k: max(r[k] for r in rows if k in r) for r in rows for k in r if k.startswith("perf/peak_")}
    summary["peak_memory_gib"] = {k.removeprefix("perf/peak_").removesuffix("_gib"): v for k, v in memory.items()}
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a small text table."""
    mfu = f"{100 * s['mfu']:.2f}%" if s["mfu"] is not None else "n/a (no peak FLOP/s)"
    lines = [f"profile: {s.get('strategy', '?')} on {s.get('world_size', '?')} x {s.get('device', '?')}, "
             f"{s['measured_steps']} measured steps (from step {s['first_measured_step']})",
             f"  {'samples/s':<28} {s['samples_per_s']:>12.2f}",
             f"  {'tokens/s (all devices)':<28} {s['tokens_per_s']:>12.1f}",
             f"  {'tokens/s per device':<28} {s['tokens_per_s_per_device']:>12.1f}",
             f"  {'MFU':<28} {mfu:>12}",
             f"  {'step time s':<28} {s['step_time_s']:>12.4f}"]
    for phase, seconds in s["breakdown_s"].items():
        share = f"{100 * seconds / s['step_time_s']:5.1f}%"
        note = "  (overlaps the others)" if phase in OVERLAPPING_PHASES else ""
        lines.append(f"    {phase + ' s':<26} {seconds:>12.4f} {share}{note}")
    for name, gib in s["peak_memory_gib"].items():
        what = "CUDA max allocated" if "cuda" in name else "peak RSS"
        lines.append(f"  {'peak memory GiB (' + what + ')':<28} {gib:>12.3f}")
    return "\n".join(lines)


def plot_breakdown(rows: list[dict[str, Any]], path: Path) -> None:
    """Stacked step-time breakdown per logged step, and tokens/s over the steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    windows = [r for r in rows if r.get("perf/window_s")]
    steps = [r["step"] for r in windows]
    fig, (ax_t, ax_r) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    bottom = [0.0] * len(windows)
    for phase in ADDITIVE_PHASES:
        values = [r.get(f"perf/time/{phase}_s", 0.0) for r in windows]
        if any(values):  # a phase that never took time (no checkpoint in these steps) is not drawn
            ax_t.bar(steps, values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
    for phase in OVERLAPPING_PHASES:
        values = [r.get(f"perf/time/{phase}_s") for r in windows]
        if any(v is not None for v in values):
            ax_t.plot(steps, [v or 0.0 for v in values], "k.--", label=f"{phase} (overlaps)")
    ax_t.set_ylim(top=1.35 * max(bottom, default=1.0))  # room for the legend
    ax_t.set_ylabel("seconds per step")
    ax_t.set_title("step-time breakdown")
    ax_t.legend(fontsize=8, ncol=4)
    ax_r.plot(steps, [r["perf/tokens_per_s"] for r in windows], "o-", label="all devices")
    ax_r.plot(steps, [r["perf/tokens_per_s_per_device"] for r in windows], "s-", label="per device")
    ax_r.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("tokens/s")
    ax_r.set_title("throughput")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
