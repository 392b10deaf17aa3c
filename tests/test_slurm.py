"""Training under a real SLURM cluster: submit, USR1 -> checkpoint -> requeue -> resume, job chains.

Runs against the one-node cluster of `launch/slurm_local.sh` (or any cluster
whose `sbatch` is on the PATH and answers): every job is submitted with
`vla-scale launch slurm`, runs the rendered script, srun, the torchrun agent
and 2 DeepSpeed ZeRO-3 ranks over gloo (CPU tasks; no GPUs here), on the tiny
preset. Where no cluster answers these tests are skipped with the reason;
with VLA_SCALE_REQUIRE_SLURM=1 (set by .ci/run) that skip is a failure.

    reference   one job, 60 steps, uninterrupted: the losses every other run must reproduce
    preempted   one job; USR1 to its batch shell (`scancel --batch --signal=USR1`, exactly what
                `--signal=B:USR1@N` sends before the time limit) once 3 steps are logged: it
                checkpoints, requeues itself, resumes, finishes
    chain       --chain 2; USR1 to the first job: it checkpoints and ends without requeueing, the
                second (afterany) resumes and finishes; the script resubmitted by hand with plain
                `sbatch` then ends without training (the run is finished)

Resumed runs must log exactly the reference's per-step losses (the same
world size resumes bit-exactly; tests/test_deepspeed.py). A rank that dies
with DeepSpeed's rare abort at exit (MACHINE.md) is restarted by torchrun
(--max-restarts), which resumes: the assertions are on what the runs wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_PRESET
from vla_scale.launch import job_state, wait
from vla_scale.train.metrics import read_metrics
from vla_scale.train.preemption import REQUEUE_RECORD

STEPS = 60  # about 10 s of training here: room for the USR1 to arrive mid-run
JOB_TIMEOUT_S = 300
COMMON = [
    f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2",
    "train.checkpoint_every=1000", "train.progress=false", "train.tensorboard=false", "train.strategy=deepspeed",
    "deepspeed.stage3_param_persistence_threshold=1000", "train.hang_timeout_s=120",
]
LAUNCH = ["--gpus-per-node", "0", "--procs-per-node", "2", "--time", "00:20:00", "--signal-lead", "60"]


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no SLURM here (sbatch is not on the PATH); start one with `bash launch/slurm_local.sh start`"
    ping = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if ping.returncode != 0 or not any(s.strip() in ("idle", "mixed", "allocated") for s in ping.stdout.split()):
        said = ((ping.stderr or ping.stdout).strip().splitlines() or ["no nodes"])[-1]
        return (f"no SLURM cluster answers (sinfo: {said}); start one with "
                "`bash launch/slurm_local.sh start` and export the SLURM_CONF it prints")
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem is not None:
        if os.environ.get("VLA_SCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"VLA_SCALE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def job_env(tmp_path_factory) -> dict[str, str]:
    """The environment sbatch exports into the jobs (its default, --export=ALL)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "VLA_SCALE_REQUEUE") and not k.startswith("SLURM_JOB")}
    env.update(TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR")
               or str(tmp_path_factory.mktemp("torch_extensions")),
               DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore::FutureWarning", VLA_SCALE_DIST_TIMEOUT_S="120",
               TMPDIR=str(tmp_path_factory.mktemp("job_tmp")))
    return env


def _launch(env: dict[str, str], source: Path, run_dir: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "vla_scale.cli", "launch", "slurm", str(TINY_PRESET), f"model.source={source}",
           f"run.output_dir={run_dir}", *COMMON, *LAUNCH, *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["job_ids"]


def _log(run_dir: Path, job: str) -> str:
    path = run_dir / "slurm" / f"{job}.out"
    return path.read_text(errors="replace") if path.is_file() else "(no log)"


def _wait(run_dir: Path, *jobs: str) -> dict[str, str]:
    states = wait(jobs, timeout_s=JOB_TIMEOUT_S)
    for job, state in states.items():
        assert state == "COMPLETED", f"job {job} ended {state}:\n{_log(run_dir, job)[-4000:]}"
    return states


def _losses(run_dir: Path) -> dict[int, float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, STEPS + 1)), f"metrics.jsonl steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _signal_after_steps(run_dir: Path, job: str, steps: int = 3) -> None:
    """USR1 to the job's batch shell as soon as `steps` steps are in metrics.jsonl (what --signal=B:USR1 sends)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"job {job} logged no steps:\n{_log(run_dir, job)[-4000:]}"
        assert job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), _log(run_dir, job)[-4000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)


def _restarts(job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return int(out.split("Restarts=")[1].split()[0])


@pytest.fixture(scope="module")
def reference_run(cluster, job_env, tiny_llava, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    (job,) = _launch(job_env, tiny_llava, run_dir)
    _wait(run_dir, job)
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    return _losses(reference_run)


def test_a_submitted_job_trains_to_the_end(reference_run, reference):
    run_dir = reference_run
    assert len(reference) == STEPS
    script = run_dir / "slurm" / "job.sbatch"
    assert script.is_file() and (run_dir / "slurm" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    (log,) = (run_dir / "slurm").glob("*.out")
    assert "srun ended with status 0" in log.read_text()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert all(r["slurm/restart_count"] == 0 for r in rows)


def test_usr1_checkpoints_requeues_and_resumes_with_the_same_losses(reference, job_env, tiny_llava, tmp_path):
    run_dir = tmp_path / "preempted"
    (job,) = _launch(job_env, tiny_llava, run_dir)
    _signal_after_steps(run_dir, job)
    _wait(run_dir, job)
    log = _log(run_dir, job)
    record = json.loads((run_dir / REQUEUE_RECORD).read_text())
    stopped = record["step"]
    assert record["job_id"] == job and 3 <= stopped < STEPS, f"not preempted mid-run: {record}\n{log[-3000:]}"
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()
    assert _restarts(job) == 1 and log.count("[vla-scale] job ") == 2 and "USR1" in log
    assert _losses(run_dir) == reference, "the requeued job must continue exactly where the first stopped"
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["slurm/restart_count"] for r in rows] == [0] * stopped + [1] * (STEPS - stopped)


def test_a_chain_of_two_jobs_continues_the_run(reference, job_env, tiny_llava, tmp_path):
    run_dir = tmp_path / "chain"
    first, second = _launch(job_env, tiny_llava, run_dir, "--chain", "2")
    _signal_after_steps(run_dir, first)
    _wait(run_dir, first, second)
    assert _restarts(first) == 0 and not (run_dir / REQUEUE_RECORD).exists(), "a chain's job must not requeue"
    assert _losses(run_dir) == reference
    first_log, second_log = _log(run_dir, first), _log(run_dir, second)
    assert "USR1" in first_log and "nothing to train" not in second_log
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 2 and checkpoints[-1] == f"step_{STEPS:08d}"  # the first job's stop, the end
    # The script can be submitted again by hand; the run is finished, so it ends without training.
    rows_before = (run_dir / "metrics.jsonl").read_text()
    again = subprocess.run(["sbatch", "--parsable", str(run_dir / "slurm" / "job.sbatch")], env=job_env,
                           capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    _wait(run_dir, again)
    assert "nothing to train" in _log(run_dir, again)
    assert (run_dir / "metrics.jsonl").read_text() == rows_before


def test_sbatch_refusing_the_job_is_one_clear_error(cluster, job_env, tiny_llava, tmp_path):
    cmd = [sys.executable, "-m", "vla_scale.cli", "launch", "slurm", str(TINY_PRESET), f"model.source={tiny_llava}",
           f"run.output_dir={tmp_path / 'run'}", *COMMON, *LAUNCH, "--partition", "no_such_partition"]
    done = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "sbatch" in done.stderr and "no_such_partition" not in done.stdout
    assert "invalid partition" in done.stderr.lower()
