"""Multi-node elastic restarts: how often does a two-node run survive a dead worker? (a script)

    python benchmarks/elastic_restarts.py [--repeats 10] [--out benchmarks/results/elastic_restarts_cpu.json]

What tests/test_elastic.py checks once, repeated: two torchrun agents on this
machine (`--nnodes=2`, c10d rendezvous on a free port, one worker each, gloo,
`--max-restarts=1`, each agent in its own mount namespace with a private
/dev/shm, as on two machines; needs root for `unshare --mount`), DeepSpeed
ZeRO-3 on the tiny preset for 6 steps with checkpoints at 2/4/6, and rank 1
exiting at the start of step 3 on the first attempt (the fault hook of
tests/workers/ds_worker.py). A repeat succeeds when both workers of the
second attempt wrote their reports, both resumed from step 2, and the
per-step losses in metrics.jsonl equal those of an uninterrupted two-node run
of the same config (the baseline, run first in the same invocation). Judged
by the files written, not by exit codes (DeepSpeed's rare abort at exit is
counted separately). Agents run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, the
supported multi-node route (vla_scale.train.distributed). Prints a table and
writes JSON with the success rate and its 95% Wilson interval.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "ds_worker.py"
PRESET = REPO / "configs" / "tiny.yaml"
PRIVATE_SHM = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o size=2g tmpfs /dev/shm && exec "$@"', "node"]
OVERRIDES = ["train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2",
             "train.weight_decay=0.1", "train.checkpoint_every=2", "train.keep_last_k=3", "train.progress=false",
             "train.tensorboard=false", "train.strategy=deepspeed", "deepspeed.stage3_param_persistence_threshold=1000",
             "train.hang_timeout_s=120"]
EXIT_ABORT = "terminate called without an active exception"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def two_nodes(env: dict[str, str], out: Path, run: Path, source: Path, timeout: float) -> tuple[list[str], bool]:
    """Run two agents to completion (or kill both at `timeout`); their stderr and whether they timed out."""
    port, run_id = free_port(), secrets.token_hex(4)
    cmd = [*PRIVATE_SHM, sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
           str(WORKER), str(out), str(PRESET), f"model.source={source}", f"run.output_dir={run}", *OVERRIDES]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    deadline, errs, timed_out = time.monotonic() + timeout, [], False
    for p in procs:
        try:
            errs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[1])
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            errs.append(p.communicate()[1])
    return errs, timed_out


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows}


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("report_rank*.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per two-node run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "elastic_restarts_cpu.json"))
    args = ap.parse_args()
    if subprocess.run([*PRIVATE_SHM, "true"], capture_output=True).returncode != 0:
        sys.exit("two nodes on one machine need a private /dev/shm per node: run as root (unshare --mount)")

    import deepspeed
    import torch

    from vla_scale.eval.metrics import wilson
    from vla_scale.models.tiny import build_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="vla-elastic-bench-"))
    source = build_tiny_llava(work / "src")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLA_SCALE_DIST_TIMEOUT_S="120",
               TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PYTHONPATH=str(REPO / "tests"), TMPDIR=str(work / "tmp"))
    (work / "tmp").mkdir()

    errs, _ = two_nodes(env, work / "base_out", work / "base_run", source, args.timeout)
    if len(reports(work / "base_out")) != 2:
        sys.exit("the uninterrupted baseline failed:\n" + "\n---\n".join(e[-3000:] for e in errs))
    baseline = losses(work / "base_run")

    rows = []
    for i in range(args.repeats):
        out, run, marker = work / f"out{i}", work / f"run{i}", work / f"fault{i}.marker"
        fault_env = {**env, "VLA_SCALE_TEST_CRASH_AT_STEP": "3", "VLA_SCALE_TEST_FAULT_MARKER": str(marker)}
        t0 = time.perf_counter()
        errs, timed_out = two_nodes(fault_env, out, run, source, args.timeout)
        wall = time.perf_counter() - t0
        reps = reports(out)
        resumed = len(reps) == 2 and all(sorted(int(k) for k in r["losses"]) == [3, 4, 5, 6] for r in reps)
        same = (run / "metrics.jsonl").is_file() and losses(run) == baseline
        ok = marker.is_file() and resumed and same
        reason = "" if ok else ("timed out" if timed_out else "no fault injected" if not marker.is_file() else
                                "reports missing" if len(reps) != 2 else "did not resume from step 2"
                                if not resumed else "losses differ from the uninterrupted run")
        rows.append({"repeat": i, "ok": ok, "wall_s": round(wall, 1), "reason": reason,
                     "exit_abort": any(EXIT_ABORT in e for e in errs),
                     "stderr_tail": "" if ok else "\n---\n".join(e[-2000:] for e in errs)})
        print(f"repeat {i:>2}: {'ok' if ok else 'FAILED (' + reason + ')'}  {wall:6.1f} s", flush=True)

    n_ok = sum(r["ok"] for r in rows)
    lo, hi = wilson(n_ok, len(rows))
    result = {
        "benchmark": "elastic_restarts", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()},
        "setup": "2 torchrun agents (--nnodes=2, c10d, 1 worker each, --max-restarts=1), gloo, ZeRO-3, tiny preset, "
                 "6 steps, checkpoints every 2, rank 1 exits at step 3 on the first attempt, "
                 "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        "repeats": len(rows), "successes": n_ok, "success_rate": n_ok / max(len(rows), 1),
        "wilson95": [lo, hi], "baseline_losses": baseline, "runs": rows,
    }
    print(f"\n{n_ok}/{len(rows)} restarts finished with the uninterrupted run's losses "
          f"(95% Wilson interval {lo:.2f}-{hi:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
