"""`evaluate`: plan a suite, run it on K environments under a policy, and write the report.

The one entry point behind `vla-scale eval`, the demo and the ablation:

    from vla_scale.eval import evaluate
    report = evaluate(policy="runs/x/export", backend="mujoco", suite="visual", episodes=20, envs=4,
                      out="eval/x-visual")
    report["summary"]["overall"]["variant_mean"]
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from dataclasses import replace
from typing import Any, Sequence

from vla_scale.errors import ConfigError

from vla_scale.eval.runner import RunTiming, backend_class, load_policy, run_episodes


def evaluate(*, policy: Any = "random", backend: str = "mujoco", suite: str = "in_distribution",
             tasks: Sequence[str] | None = None, episodes: int = 10, envs: int = 1, seed: int = 0,
             out: str | Path | None = None, gifs: int = 1, execute: int | None = None,
             backend_kwargs: dict[str, Any] | None = None, device: str | None = None, camera: str | None = None,
             progress: bool = True, overwrite: bool = False, policy_name: str | None = None,
             max_steps: int | None = None) -> dict[str, Any]:
    """Run `episodes` seeds of every (task, variant) of `suite` and return the report (a dict; also written to
    `out` when given: report.json, report.md, success.png, gifs/). `policy` is 'expert', 'random', an export
    folder, or an object with `act(observations, episodes, steps)`. `gifs` rollouts per (task, variant) are
    recorded (the first ones). `max_steps` caps every episode's step budget (for smoke tests: a capped
    evaluation is not comparable with a full one, and the report records the cap)."""
    from vla_scale.eval.metrics import summarize
    from vla_scale.eval.report import write_report

    cls = backend_class(backend)
    plan = cls.plan(suite, tasks, episodes, seed)  # bad suite, task or count: ConfigError before any work
    if max_steps is not None:
        if max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {max_steps}")
        plan = [replace(e, max_steps=min(e.max_steps, max_steps)) for e in plan]
    variants = list(cls.suites().get(suite, ())) or list(dict.fromkeys(e.variant for e in plan))
    rollout = load_policy(policy, seed=seed, device=device, camera=camera) if isinstance(policy, str) else policy
    name = policy_name or getattr(rollout, "name", type(rollout).__name__)
    kwargs = dict(backend_kwargs or {})
    if getattr(rollout, "in_worker", False) and gifs == 0 and backend == "mujoco":
        kwargs.setdefault("cameras", ())  # an expert that records nothing needs no pixels
    if len(getattr(rollout, "cameras", ())) > 1:
        kwargs.setdefault("cameras", tuple(rollout.cameras))  # a model of several cameras: render each of them

    bar = None
    done = wins = 0
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc=f"eval {name} {backend}/{suite}", unit="ep", file=sys.stderr)

    def tick(result: Any) -> None:
        nonlocal done, wins
        done, wins = done + 1, wins + bool(result.success)
        if bar is not None:
            bar.set_postfix_str(f"success {wins}/{done} = {100 * wins / done:.0f}%")
            bar.update(1)

    timing = RunTiming()
    try:
        results = run_episodes(backend, plan, rollout, envs=envs, backend_kwargs=kwargs,
                               record=lambda ep: ep.index < gifs, execute=execute, progress=tick, timing=timing)
    finally:
        if bar is not None:
            bar.close()
    meta = {"backend": backend, "suite": suite, "variants": variants,
            "tasks": list(dict.fromkeys(e.task for e in plan)), "policy": name,
            "policy_spec": policy if isinstance(policy, str) else name, "seed": seed,
            "episodes_per_cell": episodes, "envs": envs, "execute": execute, "max_steps": max_steps, "backend_kwargs": kwargs,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
            "machine": platform.machine()}
    timing_d = {"wall_seconds": round(timing.wall_seconds, 3), "policy_seconds": round(timing.policy_seconds, 3),
                "policy_calls": timing.policy_calls, "policy_rows": timing.policy_rows, "env_steps": timing.env_steps}
    if out is not None:
        path = write_report(out, meta=meta, results=results, timing=timing_d, overwrite=overwrite)

        report = json.loads((path / "report.json").read_text())
        report["path"] = str(path)
        return report
    return {"meta": meta, "summary": summarize(results, variants), "timing": timing_d,
            "episodes": [r.to_dict() for r in results]}
