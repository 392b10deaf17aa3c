"""Evaluation throughput (a script, not a test): environment steps per second and the policy's time per step.

    python benchmarks/eval.py [--out benchmarks/results/eval_cpu.json] [--envs 1,2,4] [--steps 100]
                              [--libero]

1. Environment steps per second with rendering, through the product's runner
   (`vla_scale.eval.runner.run_episodes`) with the random policy (whose cost is
   negligible), for K = 1 (in-process) and K worker processes. The baseline
   is K = 1 in the same run. Built-in MuJoCo tabletop, 128 px, primary
   camera; with `--libero`, the LIBERO backend too (if installed).
2. The policy's time per environment step, batched (one `predict_actions`
   over the K environments' observations per round) against unbatched (K
   `predict_action` calls per round, the same actions), on a tiny exported
   VLA with random weights (`ModelPolicy(batched=...)`), same episodes.

The rendering figures depend on the renderer (Mesa llvmpipe on the CPU
machine: the software renderer, so every process also costs CPU time).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")


def env_rate(backend: str, envs: int, steps: int, episodes: int, kwargs: dict, suite: str, task: str | None):
    from vla_scale.eval.runner import RandomPolicy, RunTiming, backend_class, run_episodes

    cls = backend_class(backend)
    plan = [replace(e, max_steps=steps) for e in cls.plan(suite, [task] if task else None, episodes, 0)]
    plan = plan[:max(envs, episodes)]
    timing = RunTiming()
    run_episodes(backend, plan, RandomPolicy(0), envs=envs, backend_kwargs=kwargs, timing=timing)
    # The runner starts its workers inside the call (spawn, imports, scene build), so two rates: the whole
    # call's, and the steady one, with start-up (the wall time of a one-step run) taken off.
    start = RunTiming()
    run_episodes(backend, [replace(e, max_steps=1) for e in plan[:envs]], RandomPolicy(0), envs=envs,
                 backend_kwargs=kwargs, timing=start)
    steady = timing.env_steps / max(timing.wall_seconds - start.wall_seconds, 1e-9)
    return {"backend": backend, "envs": envs, "env_steps": timing.env_steps, "wall_s": round(timing.wall_seconds, 3),
            "startup_s": round(start.wall_seconds, 3), "steps_per_s": round(timing.env_steps / timing.wall_seconds, 1),
            "steady_steps_per_s": round(steady, 1)}


def policy_rate(workdir: Path, envs: int, steps: int, llm_hidden: int, llm_layers: int):
    import torch

    from vla_scale.config import config_to_dict, load_config
    from vla_scale.eval.mujoco_backend import MujocoBackend
    from vla_scale.eval.runner import ModelPolicy, RunTiming, run_episodes
    from vla_scale.models.export import save_export
    from vla_scale.models.loading import build_vla
    from vla_scale.models.tiny import build_tiny_llava
    from vla_scale.policy import VLAPolicy

    src = build_tiny_llava(workdir / "src", llm_hidden=llm_hidden, llm_layers=llm_layers)
    cfg = load_config(None, [f"model.source={src}", "model.image_size=32", "actions.style=vla-plus",
                             "model.encoders=[{name: frozen}, {name: trained, trainable: true}]"])
    torch.manual_seed(0)
    vla, tok = build_vla(cfg.model)
    stats = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    save_export(vla, tok, stats, config_to_dict(cfg)["actions"], workdir / "export")
    policy = VLAPolicy.from_pretrained(workdir / "export", device="cpu")
    params = sum(p.numel() for p in policy.model.parameters())
    per_task = -(-envs // len(MujocoBackend.tasks("in_distribution")))
    plan = [replace(e, max_steps=steps) for e in MujocoBackend.plan("in_distribution", None, per_task, 0)][:envs]
    rows = []
    outcomes = {}
    for batched in (False, True):
        timing = RunTiming()
        results = run_episodes("mujoco", plan, ModelPolicy(policy, batched=batched), envs=envs, timing=timing)
        outcomes[batched] = [r.outcome() for r in results]
        rows.append({"batched": batched, "envs": envs, "llm_hidden": llm_hidden, "llm_layers": llm_layers,
                     "params": params, "policy_calls": timing.policy_calls,
                     "env_steps": timing.env_steps,
                     "policy_ms_per_env_step": round(1000 * timing.policy_seconds / timing.env_steps, 2),
                     "wall_s": round(timing.wall_seconds, 2)})
    assert outcomes[True] == outcomes[False], "batched and unbatched policies must take the same actions"
    rows[1]["speedup"] = round(rows[0]["policy_ms_per_env_step"] / rows[1]["policy_ms_per_env_step"], 2)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/eval_cpu.json")
    p.add_argument("--envs", default="1,2,4")
    p.add_argument("--steps", type=int, default=100, help="steps per episode")
    p.add_argument("--episodes", type=int, default=8, help="episodes per environment-rate run")
    p.add_argument("--policy-envs", type=int, default=4)
    p.add_argument("--policy-steps", type=int, default=20)
    p.add_argument("--libero", action="store_true", help="also measure the LIBERO backend (needs .[libero])")
    args = p.parse_args()
    envs = [int(k) for k in args.envs.split(",")]
    result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "env_rate": [], "policy": []}
    for k in envs:
        row = env_rate("mujoco", k, args.steps, args.episodes, {"cameras": ("primary",), "image_size": 128},
                       "in_distribution", None)
        print(row, flush=True)
        result["env_rate"].append(row)
    if args.libero:
        for k in envs:
            row = env_rate("libero", k, args.steps, max(k, 2), {}, "libero_object", None)
            print(row, flush=True)
            result["env_rate"].append(row)
    for hidden, layers in ((64, 2), (256, 4)):  # the two CPU sizes of benchmarks/decode.py
        with tempfile.TemporaryDirectory() as tmp:
            result["policy"] += policy_rate(Path(tmp), args.policy_envs, args.policy_steps, hidden, layers)
    for row in result["policy"]:
        print(row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
