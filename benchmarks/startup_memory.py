"""Host memory at ZeRO-3 start-up: every rank building the model vs rank 0 building it (a script).

    python benchmarks/startup_memory.py [--hidden 1024] [--layers 6] [--out benchmarks/results/startup_memory_cpu.json]

Two 1-step trainings of a wider tiny LLaVA (Llama `--hidden` wide, `--layers`
deep) with DeepSpeed ZeRO-3 on 2 CPU ranks under torchrun (gloo):
`deepspeed.build_on_every_rank=true` (the baseline: every rank builds the
whole model on the host, then ZeRO-3 partitions it) and the default (rank 0
builds it, the other rank gets a weightless skeleton and its partitions by
broadcast). Each rank's resident memory attributable to the model during
start-up is measured by tests/workers/ds_worker.py (VmHWM over the build and
the set-up up to the optimizer, imports excluded, with a fixed glibc mmap
threshold so that freed full-size parameters do not linger as heap
fragmentation; see tests/test_zero3_startup.py). Prints a table (MiB and
multiples of one fp32 copy of the trainable model) and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "ds_worker.py"
PRESET = REPO / "configs" / "tiny.yaml"
MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "startup_memory_cpu.json"))
    args = ap.parse_args()

    import deepspeed
    import torch

    from vla_scale.models.tiny import build_tiny_llava
    from vla_scale.train.distributed import free_port

    work = Path(tempfile.mkdtemp(prefix="vla-startup-bench-"))
    source = build_tiny_llava(work / "src", llm_hidden=args.hidden, llm_layers=args.layers)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"),
               PYTHONPATH=str(REPO / "tests"), TMPDIR=str(work / "tmp"), VLA_SCALE_TEST_STARTUP_MEMORY="1",
               MALLOC_MMAP_THRESHOLD_=str(MIB))
    (work / "tmp").mkdir()
    rows, full = [], 0
    for name, every_rank in (("every rank builds (before)", "true"), ("rank 0 builds (after)", "false")):
        out = work / every_rank
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(WORKER), str(out), str(PRESET),
               f"model.source={source}", f"run.output_dir={out / 'run'}", "train.steps=1",
               "train.global_batch_size=8", "train.micro_batch_size=2", "train.progress=false",
               "train.tensorboard=false", "train.strategy=deepspeed", f"deepspeed.build_on_every_rank={every_rank}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        reports = [json.loads(p.read_text()) for p in sorted(out.glob("report_rank*.json"))]
        if len(reports) != 2:
            sys.exit(f"{name}: the run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        full = 4 * sum(t["ds_numel"] for t in reports[0]["trainable"])
        for rep in reports:
            peak = rep["startup_memory"]["peak"]
            rows.append({"mode": name, "rank": rep["rank"], "peak_bytes": peak, "peak_mib": round(peak / MIB, 1),
                         "x_fp32_trainable": round(peak / full, 2), **rep["startup_memory"]})
    print(f"trainable parameters: {full // 4:,} ({full / MIB:.0f} MiB in fp32), 2 ranks\n")
    print(f"{'mode':<30}{'rank':>5}{'peak MiB':>10}{'x fp32 copy':>13}")
    for r in rows:
        print(f"{r['mode']:<30}{r['rank']:>5}{r['peak_mib']:>10.1f}{r['x_fp32_trainable']:>13.2f}")
    result = {"benchmark": "startup_memory", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
              "model": {"llm_hidden": args.hidden, "llm_layers": args.layers, "trainable_fp32_bytes": full},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
