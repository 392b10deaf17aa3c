"""LIBERO backend throughput: control steps per second in one process, with and without rendering (a script).

    MUJOCO_GL=egl python benchmarks/libero_steps.py [--steps 60] [--out benchmarks/results/libero_cpu.json]

Needs the libero extra (`pip install .[libero]`). One `LiberoBackend` per configuration, on
libero_object task 0, initial state 0: the time to build the environment and reset (first reset),
a second reset of the same task (robosuite's hard reset: the scene is rebuilt), and `--steps`
control steps of small random actions through `LiberoBackend.step` (physics, 25 substeps of 2 ms,
plus rendering every camera and the 180-degree flip). The baseline in the same run is physics only
(`cameras=()`). Prints a table and writes JSON.
"""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np

CONFIGS = [  # (label, cameras, image_size)
    ("physics only", (), 224),
    ("primary 224", ("primary",), 224),
    ("primary+wrist 224", ("primary", "wrist"), 224),
    ("primary+wrist 256", ("primary", "wrist"), 256),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "libero_cpu.json"))
    args = ap.parse_args()

    import mujoco

    from vla_scale.eval.libero_backend import LiberoBackend

    task = LiberoBackend.tasks("libero_object")[0]
    rng = np.random.default_rng(0)
    actions = [np.concatenate([rng.uniform(-0.01, 0.01, 3), rng.uniform(-0.05, 0.05, 3), [0.0]])
               for _ in range(args.steps)]
    rows = []
    for label, cameras, size in CONFIGS:
        t0 = time.perf_counter()
        backend = LiberoBackend(cameras=cameras, image_size=size)
        backend.reset(task, 0)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend.reset(task, 0)
        again = time.perf_counter() - t0
        t0 = time.perf_counter()
        for a in actions:
            backend.step(a)
        elapsed = time.perf_counter() - t0
        backend.close()
        rows.append({"config": label, "cameras": list(cameras), "image_size": size, "steps": args.steps,
                     "steps_per_s": args.steps / elapsed, "ms_per_step": 1000 * elapsed / args.steps,
                     "build_and_first_reset_s": first, "reset_s": again})
        print(f"{label:20s} {rows[-1]['steps_per_s']:7.1f} steps/s  {rows[-1]['ms_per_step']:7.1f} ms/step  "
              f"build+reset {first:5.1f} s  reset {again:5.1f} s", flush=True)
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "mujoco": mujoco.__version__, "mujoco_gl": os.environ.get("MUJOCO_GL"),
              "task": f"libero_object/{task}", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
