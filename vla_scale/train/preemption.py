"""Preemption and time limits: stop at a step boundary on SIGUSR1/SIGTERM, checkpoint, requeue.

SLURM warns a job before it ends: `sbatch --signal=B:USR1@N` sends SIGUSR1
N seconds before the time limit (the script rendered by `vla_scale.launch`
forwards it through srun and torchrun to every rank), and preemption or the
limit itself send SIGTERM, then SIGKILL `KillWait` seconds later. The
trainer reacts the same way to both:

    handler (any rank, any time)   records the signal; nothing else
    after every step (all ranks)   `PreemptionWatch.agreed()`: one all-reduce of a 0/1 flag,
                                   so every rank stops after the same step and none is left
                                   waiting in a collective for a peer that already left
    then (all ranks)               checkpoint this step (unless it was just saved), leave the loop
    then (rank 0)                  `requeue_after_preemption`: `scontrol requeue $SLURM_JOB_ID`;
                                   the requeued job runs the same script, and `--resume auto`
                                   continues from that checkpoint

The handlers are in place while the training loop runs. A signal during
start-up (model build, resume), when there is nothing new to save, ends the
process as it always did; torchrun or the requeue starts it again.

A signal that arrives during a checkpoint save only sets the flag: the
save runs to its end (the checkpoint manager writes `COMPLETE`, renames,
then moves `latest`), and the flag is acted on at the next agreement.

Requeue or not (rank 0, only inside a SLURM job):
- a run that reached `train.steps` is finished: no requeue;
- `VLA_SCALE_REQUEUE=0` (set by `--chain` scripts: the next job of the
  chain continues the run): no requeue;
- no progress since the last requeue of this job (the step recorded in
  `<run>/slurm/requeue.json` is not below this one): no requeue, an error
  in the log, so a job that cannot make a step before its signal does not
  loop forever;
- otherwise the record is written (atomically) and the job requeued.
A requeued job waits SLURM's `cred_expire` (120 s by default) before it may
start again; that is the cluster's own safety margin and is left alone.

`SLURM_RESTART_COUNT` (how many times this job was requeued) goes into the
metrics as `slurm/restart_count`.

This module must never do work inside a signal handler, requeue from a
rank other than 0, requeue a finished run, or touch a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import torch

from vla_scale.train.checkpoint import write_json_atomic

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEUE_ENV = "VLA_SCALE_REQUEUE"  # "0": exit without requeueing (job chains)
REQUEUE_RECORD = Path("slurm") / "requeue.json"  # inside the run folder


@dataclass(frozen=True)
class SlurmJob:
    """The SLURM job this process runs in, from the variables SLURM sets."""

    job_id: str
    restart_count: int  # SLURM_RESTART_COUNT: 0 on the first run, +1 per requeue

    @classmethod
    def from_env(cls) -> "SlurmJob | None":
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            return None
        return cls(job_id, int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))


class PreemptionWatch:
    """SIGUSR1/SIGTERM handlers that only record the signal, and the per-step agreement on it.

    `install()` before the training loop, `uninstall()` after it (the
    previous handlers come back). Outside the main thread, where Python
    cannot install handlers, it records nothing, and `agreed` still takes
    part in the collective.
    """

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal number, set by the handler
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        else:
            log.warning("training outside the main thread: SIGUSR1/SIGTERM will not stop it at a step boundary")
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> bool:
        """True on every rank if any rank got a signal (a collective: every rank calls it after every step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        stop = bool(all_reduce_sum(flag).item() > 0)
        if stop and self.received is not None:
            log.warning("got %s: stopping after this step with a checkpoint", signal.Signals(self.received).name)
        return stop


def requeue_enabled() -> bool:
    return os.environ.get(REQUEUE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def requeue_decision(run_dir: Path, job: SlurmJob | None, step: int, total_steps: int) -> tuple[bool, str]:
    """Whether to requeue after a preemption that stopped at `step`, and why (pure: reads the record only)."""
    if job is None:
        return False, "not inside a SLURM job; resume with the same command (--resume auto)"
    if step >= total_steps:
        return False, f"the run is finished (step {step} of {total_steps})"
    if not requeue_enabled():
        return False, f"{REQUEUE_ENV}=0 (a job chain: the next job continues from step {step})"
    record = read_requeue_record(run_dir)
    if record is not None and record.get("job_id") == job.job_id and int(record.get("step", -1)) >= step:
        return False, (f"no progress since job {job.job_id} was last requeued at step {record['step']} "
                       f"(restart {record.get('restart_count')}): not requeuing again, to avoid an endless loop; "
                       "resubmit with a longer --time or a shorter --signal-lead")
    return True, f"requeuing job {job.job_id} to continue from step {step}"


def read_requeue_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / REQUEUE_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def requeue_after_preemption(run_dir: Path, step: int, total_steps: int) -> bool:
    """Rank 0, after the checkpoint of `step`: requeue this SLURM job if the rules above allow; True if it did."""
    job = SlurmJob.from_env()
    requeue, reason = requeue_decision(run_dir, job, step, total_steps)
    if not requeue:
        (log.error if "no progress" in reason else log.warning)("preempted at step %d, not requeued: %s",
                                                                step, reason)
        return False
    assert job is not None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.error("preempted at step %d: scontrol is not on the PATH, cannot requeue job %s", step, job.job_id)
        return False
    (Path(run_dir) / REQUEUE_RECORD).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(run_dir) / REQUEUE_RECORD, {"job_id": job.job_id, "step": step,
                                                       "restart_count": job.restart_count, "time": time.time()})
    log.warning("preempted at step %d: %s", step, reason)
    # SLURM now ends this job's processes (SIGTERM, then SIGKILL after KillWait): the checkpoint is
    # committed and the metrics closed, so nothing is lost whichever process goes first.
    done = subprocess.run([scontrol, "requeue", job.job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job.job_id, (done.stderr or done.stdout).strip())
        return False
    return True
