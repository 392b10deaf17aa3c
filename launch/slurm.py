"""Submit a training run to SLURM: check, render a readable sbatch script, `sbatch` it (or a chain of them).

    submit(config, overrides, nodes=, gpus_per_node=, time=, ...)
      load + validate the config, resolve the run folder to an absolute path
      check: --time well formed, ranks = nodes x procs per node fit the config
             (strategy, batch split via `vla_scale.train.batching`), sbatch on PATH
      write <run>/slurm/config.yaml (the resolved config every job of the run reads)
            <run>/slurm/job.sbatch  (the script; edit it and `sbatch` it again by hand)
      sbatch it; with chain=K, K times, each job `--dependency=afterany:` the previous
      -> job ids

The script runs one `srun` task per node; each runs `vla_scale.launch.agent`
(torchrun that passes SIGUSR1 on to its workers) with a c10d rendezvous on
the first node of the allocation, which starts the node's ranks running
`vla-scale train CONFIG --resume auto`. So the first job starts the run and
every later start (a requeue, the next job of a chain) continues it from its
latest checkpoint; a run that is already finished ends without training.

Signals: `--signal=B:USR1@<lead>` warns the batch shell `lead` seconds before
the time limit; its trap forwards USR1 to srun, srun to every node's agent,
the agent to its ranks (`vla_scale.train.preemption`: finish the step, agree,
checkpoint, requeue). A single job requeues itself (`--requeue`); the jobs of
a chain do not (`VLA_SCALE_REQUEUE=0`): the next job of the chain continues.
Logs: `<run>/slurm/<jobid>.out`, appended to across requeues
(`--open-mode=append`).

Every check runs before anything is written or submitted, and fails with a
`LaunchError` or `ConfigError` that names the option and what would work.
This module must never start training itself, never write outside
`<run>/slurm/`, and never submit a job that failed a check.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time as _time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from vla_scale.config import Config, load_config, save_config
from vla_scale.errors import ConfigError, LaunchError
from vla_scale.train.batching import resolve_accumulation

SLURM_DIR = "slurm"  # inside the run folder
SCRIPT_NAME = "job.sbatch"
CONFIG_NAME = "config.yaml"
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})$")
# PREEMPTED is left out: a preempted job with --requeue passes through it on its way back to PENDING.
_FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE"}


@dataclass(frozen=True)
class SlurmOptions:
    """What to ask SLURM for; the CLI's `vla-scale launch slurm` options, one to one."""

    nodes: int = 1
    gpus_per_node: int = 8
    time: str = "24:00:00"  # [D-]HH:MM:SS
    # Ranks per node; defaults to gpus_per_node (one rank per GPU). Needed on a cluster without GPUs.
    procs_per_node: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None  # per node, e.g. 500G; None: the partition's default
    cpus_per_task: int | None = None  # CPUs for each node's task (its agent and all its ranks)
    signal_lead_s: int = 300  # SIGUSR1 this long before the time limit (SLURM may send it up to 60 s earlier)
    chain: int = 1  # K jobs linked by afterany dependencies
    max_restarts: int = 3  # torchrun's elastic restarts within one job (a rank that crashed)
    rdzv_port: int | None = None  # default: 20000 + job id mod 20000, so jobs sharing a node differ
    job_name: str | None = None  # default: run.name
    python: str = field(default_factory=lambda: sys.executable)  # the interpreter every node runs

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass(frozen=True)
class SlurmSubmission:
    """What `submit` did: the script, its text, and the job ids (empty for a dry run)."""

    script: Path
    text: str
    job_ids: list[str]


def parse_time(text: str) -> int:
    """`[D-]HH:MM:SS` as seconds; LaunchError for anything else."""
    m = _TIME_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None or int(m.group(3)) > 59 or int(m.group(4)) > 59:
        raise LaunchError(f"--time {text!r}: use HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00 or 2-00:00:00), "
                          "minutes and seconds below 60")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise LaunchError(f"--time {text!r}: the time limit must be positive")
    return total


def check(cfg: Config, options: SlurmOptions) -> int:
    """Every check that does not need SLURM; returns the world size. Raises LaunchError/ConfigError."""
    o = options
    limit_s = parse_time(o.time)
    for name, value in (("--nodes", o.nodes), ("--chain", o.chain)):
        if value < 1:
            raise LaunchError(f"{name} must be at least 1, got {value}")
    if o.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be 0 or more, got {o.gpus_per_node}")
    if o.procs_per_node is not None and o.procs_per_node < 1:
        raise LaunchError(f"--procs-per-node must be at least 1, got {o.procs_per_node}")
    if o.gpus_per_node == 0 and o.procs_per_node is None:
        raise LaunchError("--gpus-per-node 0: give --procs-per-node N, the number of ranks per node on a "
                          "cluster without GPUs")
    if o.gpus_per_node > 0 and o.procs_per_node not in (None, o.gpus_per_node):
        raise LaunchError(f"--procs-per-node {o.procs_per_node} contradicts --gpus-per-node {o.gpus_per_node}: "
                          "each rank drives one GPU; leave --procs-per-node out")
    if o.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 or more, got {o.max_restarts}")
    if not 0 <= o.signal_lead_s < limit_s:
        raise LaunchError(f"--signal-lead {o.signal_lead_s}s must be below the time limit --time {o.time} "
                          f"({limit_s}s): the warning must come before the end")
    if o.cpus_per_task is not None and o.cpus_per_task < o.ranks_per_node:
        raise LaunchError(f"--cpus-per-task {o.cpus_per_task} is fewer than the {o.ranks_per_node} ranks per node")
    world = o.world_size
    if cfg.train.strategy == "single" and world > 1:
        raise ConfigError(f"train.strategy=single trains in one process, but --nodes {o.nodes} x "
                          f"{o.ranks_per_node} ranks per node = {world} ranks: use train.strategy=deepspeed, "
                          "or --nodes 1 with one rank per node")
    resolve_accumulation(cfg.train, world)
    return world


def _sbatch_lines(cfg: Config, o: SlurmOptions, log_dir: Path, workdir: Path) -> list[tuple[str, str]]:
    """(#SBATCH option, why) pairs, in the order they appear in the script."""
    lines = [
        (f"--job-name={o.job_name or cfg.run.name}", ""),
        (f"--nodes={o.nodes}", ""),
        ("--ntasks-per-node=1", "one torchrun agent per node; it starts the node's ranks"),
    ]
    if o.gpus_per_node:
        lines.append((f"--gpus-per-node={o.gpus_per_node}", "one rank per GPU"))
    if o.cpus_per_task:
        lines.append((f"--cpus-per-task={o.cpus_per_task}", "for the agent and all of the node's ranks"))
    for opt, value in (("partition", o.partition), ("account", o.account), ("qos", o.qos),
                       ("constraint", o.constraint), ("mem", o.mem)):
        if value:
            lines.append((f"--{opt}={value}", ""))
    lines += [
        (f"--time={o.time}", ""),
        (f"--signal=B:USR1@{o.signal_lead_s}", f"USR1 to this script {o.signal_lead_s}s before the time limit"),
        ("--requeue", "preemption and `scontrol requeue` put the job back in the queue"),
        ("--open-mode=append", "a requeued job appends to its log instead of replacing it"),
        (f"--output={log_dir}/%j.out", "one log per job id; stderr too"),
        (f"--chdir={workdir}", "relative paths in the config resolve from here"),
    ]
    return lines


def render_sbatch(cfg: Config, options: SlurmOptions, config_file: Path, workdir: Path | None = None) -> str:
    """The sbatch script for `cfg` (whose run.output_dir must be absolute), reading `config_file`."""
    o = options
    run_dir = Path(cfg.run.output_dir)
    log_dir = run_dir / SLURM_DIR
    workdir = workdir or Path.cwd()
    sbatch = _sbatch_lines(cfg, o, log_dir, workdir)
    width = max(len(opt) for opt, _ in sbatch) + len("#SBATCH ") + 2
    header = "\n".join(f"{'#SBATCH ' + opt:<{width}}# {why}" if why else f"#SBATCH {opt}" for opt, why in sbatch)
    rdzv_port = str(o.rdzv_port) if o.rdzv_port else "$((20000 + SLURM_JOB_ID % 20000))"
    chain_note = (f"# Job chain of {o.chain}: each job stops at its time limit with a checkpoint, without requeueing;\n"
                  "# the next job (--dependency=afterany) continues the run.\n"
                  "export VLA_SCALE_REQUEUE=0\n") if o.chain > 1 else (
                  "# At the time limit (or preemption) the job checkpoints and requeues itself; set this to 0 to\n"
                  "# make it stop instead.\n"
                  "export VLA_SCALE_REQUEUE=1\n")
    threads = ""
    if o.cpus_per_task:
        threads = f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{max(1, o.cpus_per_task // o.ranks_per_node)}}}\n"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    q = shlex.quote
    return f"""#!/bin/bash
# vla-scale training job for run '{cfg.run.name}', written by `vla-scale launch slurm` on {stamp}.
# {o.nodes} node(s) x {o.ranks_per_node} rank(s) = {o.world_size} rank(s); train.strategy={cfg.train.strategy}.
# Edit anything below and submit it again with:  sbatch {q(str(log_dir / SCRIPT_NAME))}
# Every start of this script (first start, requeue, next job of a chain) resumes the run from its
# latest checkpoint; a finished run ends at once.
{header}

set -uo pipefail

PYTHON={q(o.python)}
CONFIG={q(str(config_file))}   # the resolved config (preset + overrides) of this run

# --- environment ---------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1      # never reach a model hub from a compute node
# Multi-node elastic restarts: each node's agent counts its own restarts, so a store shared across
# restarts is read with stale keys (gloo connectFullMesh failures); a fresh store per attempt is safe.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# NCCL (GPUs): fail fast on a dead peer instead of hanging in a collective; warnings into the log.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${{NCCL_DEBUG:-WARN}}
# If the default network interface is the wrong one, name it (NCCL's bootstrap; gloo on CPU):
# export NCCL_SOCKET_IFNAME=ib0
# export GLOO_SOCKET_IFNAME=eth0
{threads}{chain_note}
# --- rendezvous: c10d on the first node of the allocation -------------------------------------------
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT={rdzv_port}
echo "[vla-scale] job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST," \\
     "rendezvous $HEAD_NODE:$RDZV_PORT, $(date -u '+%F %T') UTC"

# --- USR1 before the time limit: pass it on to srun, which passes it to every node's agent ---------
srun_pid=""
trap 'echo "[vla-scale] USR1: asking the ranks to checkpoint and stop"; [[ -n $srun_pid ]] && kill -USR1 $srun_pid' USR1

srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\
  "$PYTHON" -m vla_scale.launch.agent \\
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={o.ranks_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \\
    --max-restarts={o.max_restarts} \\
    -m vla_scale.cli train "$CONFIG" --resume auto &
srun_pid=$!
# `wait` returns early when a trapped signal arrives: wait again until srun itself has ended.
while :; do
  wait "$srun_pid"; status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
echo "[vla-scale] srun ended with status $status, $(date -u '+%F %T') UTC"
exit "$status"
"""


def _resolve_config(config: str | os.PathLike[str] | Config, overrides: Sequence[str]) -> Config:
    if isinstance(config, Config):
        if overrides:
            raise LaunchError("overrides apply to a config file; change the Config object instead")
        cfg = replace(config)
    else:
        cfg = load_config(config, list(overrides))
    cfg.run = replace(cfg.run, output_dir=str(Path(cfg.run.output_dir).resolve()))
    return cfg


def sbatch_path() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise LaunchError("sbatch is not on the PATH: run this on a SLURM login node, or add --dry-run to "
                          "print the script without submitting it")
    return found


def submit(config: str | os.PathLike[str] | Config, overrides: Sequence[str] = (), *, dry_run: bool = False,
           **options: object) -> SlurmSubmission:
    """Check, render and submit (or, with `dry_run`, only render) a training run; see the module docstring.

    `options` are `SlurmOptions` fields (nodes=, gpus_per_node=, time=, chain=, ...). Returns the script's
    path and text and the job ids in chain order (none for a dry run, which writes nothing).
    """
    try:
        opts = SlurmOptions(**options)  # type: ignore[arg-type]
    except TypeError as e:
        raise LaunchError(f"submit(): {e}") from None
    cfg = _resolve_config(config, overrides)
    check(cfg, opts)
    slurm_dir = Path(cfg.run.output_dir) / SLURM_DIR
    config_file, script = slurm_dir / CONFIG_NAME, slurm_dir / SCRIPT_NAME
    text = render_sbatch(cfg, opts, config_file)
    if dry_run:
        return SlurmSubmission(script, text, [])
    sbatch = sbatch_path()
    slurm_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_file)
    tmp = script.with_name(script.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, script)
    job_ids: list[str] = []
    for _ in range(opts.chain):
        cmd = [sbatch, "--parsable"]
        if job_ids:
            cmd.append(f"--dependency=afterany:{job_ids[-1]}")
        done = subprocess.run([*cmd, str(script)], capture_output=True, text=True)
        if done.returncode != 0:
            already = f" (jobs already submitted: {', '.join(job_ids)})" if job_ids else ""
            said = "; ".join(line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip())
            raise LaunchError(f"sbatch {script} failed{already}: {said}")
        job_ids.append(done.stdout.strip().split(";")[0])
    return SlurmSubmission(script, text, job_ids)


def job_state(job_id: str) -> str:
    """SLURM's state of a job (PENDING, RUNNING, COMPLETED, ...), from `scontrol show job`."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise LaunchError("scontrol is not on the PATH")
    done = subprocess.run([scontrol, "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    m = re.search(r"\bJobState=(\S+)", done.stdout)
    if done.returncode != 0 or m is None:
        raise LaunchError(f"job {job_id}: {(done.stderr or done.stdout).strip() or 'unknown to scontrol'}")
    return m.group(1)


def wait(job_ids: Iterable[str], timeout_s: float, poll_s: float = 2.0) -> dict[str, str]:
    """Wait until every job has ended; their final states. LaunchError after `timeout_s`."""
    pending = list(job_ids)
    states: dict[str, str] = {}
    deadline = _time.monotonic() + timeout_s
    while pending:
        for job in list(pending):
            state = job_state(job)
            if state in _FINAL_STATES:
                states[job] = state
                pending.remove(job)
        if pending:
            if _time.monotonic() > deadline:
                raise LaunchError(f"jobs {', '.join(pending)} still not finished after {timeout_s:.0f}s")
            _time.sleep(poll_s)
    return states
