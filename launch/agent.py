"""torchrun, with SIGUSR1 passed on to its workers: what every node of a SLURM job runs.

torchrun's elastic agent handles SIGTERM, SIGINT, SIGHUP and SIGQUIT (it
stops its workers) but not SIGUSR1, whose default action kills the agent and,
with it, the node's ranks, without a checkpoint. SLURM's early warning before
a time limit (`sbatch --signal`) is SIGUSR1, so the rendered sbatch script
runs this module instead of torchrun: it installs a SIGUSR1 handler that
forwards the signal to the agent's worker processes, then runs torchrun's
own `main` in this same process with the same arguments. The workers
(`vla_scale.train.preemption`) stop after the current step, checkpoint and
exit 0, so the agent sees a successful run and does not restart them.

The workers are the agent's direct children, each started in a session of
its own (torchrun's choice), so a process-group kill would miss them; they
are found by parent PID instead.

Usage (the arguments are torchrun's):
    python -m vla_scale.launch.agent --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:PORT -m vla_scale.cli train CONFIG

This module must never handle any other signal (torchrun's own handlers
stay in charge of SIGTERM and friends: it only reports their end in one
line) and never start a process itself.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

import psutil

log = logging.getLogger("vla_scale.launch.agent")


def forward_to_children(signum: int, frame: FrameType | None = None) -> None:
    """Send `signum` to every direct child of this process (torchrun's workers)."""
    children = psutil.Process(os.getpid()).children(recursive=False)
    for child in children:
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass  # a worker that just exited
    print(f"[vla_scale.launch.agent] {signal.Signals(signum).name} forwarded to {len(children)} worker(s)",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException

    signal.signal(signal.SIGUSR1, forward_to_children)
    try:
        torchrun.main(sys.argv[1:] if argv is None else argv)
    except SignalException as e:
        # SLURM ends the job's processes with SIGTERM (a requeue, scancel, the time limit); torchrun has
        # already stopped the workers. One line instead of torchrun's traceback, and the usual exit status.
        print(f"[vla_scale.launch.agent] stopped by {signal.Signals(e.sigval).name}; workers stopped",
              file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
