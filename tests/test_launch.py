"""`vla-scale launch slurm` without a cluster: the rendered script, and every bad input refused before submitting.

What a user relies on: the script asks SLURM for what the options say (and
for the early USR1, the requeue, appended per-job logs), starts one torchrun
agent per node with a c10d rendezvous, is valid bash they can edit and
resubmit; a mistake (no sbatch, a malformed --time, ranks the config cannot
use, a batch the world cannot divide) is one clear error and nothing is
written or submitted. The requeue rules are checked here as a pure function;
tests/test_slurm.py runs all of it on a real cluster.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_PRESET
from vla_scale.cli import main
from vla_scale.config import load_config
from vla_scale.errors import LaunchError
from vla_scale.launch import parse_time, submit
from vla_scale.train.preemption import REQUEUE_RECORD, PreemptionWatch, SlurmJob, requeue_decision

DS = ["train.strategy=deepspeed", "train.global_batch_size=64", "train.micro_batch_size=2"]


def _dry(tmp_path: Path, *overrides: str, **options: object) -> str:
    opts = {"nodes": 2, "gpus_per_node": 4, "time": "04:00:00", **options}
    return submit(TINY_PRESET, [f"run.output_dir={tmp_path / 'run'}", *DS, *overrides], dry_run=True,
                  **opts).text


def test_script_asks_for_what_the_options_say(tmp_path):
    text = _dry(tmp_path, partition="gpu", account="robots", qos="high", constraint="h100", mem="500G",
                cpus_per_task=32, signal_lead_s=600)
    run = tmp_path / "run"
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --partition=gpu", "#SBATCH --account=robots",
                 "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --mem=500G",
                 "#SBATCH --time=04:00:00", "#SBATCH --signal=B:USR1@600", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={run}/slurm/%j.out"):
        assert any(ln.startswith(line) for ln in text.splitlines()), f"missing {line!r} in:\n{text}"
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text
    assert "export VLA_SCALE_REQUEUE=1" in text
    assert "--nproc-per-node=4" in text and "--rdzv-backend=c10d" in text
    assert '--rdzv-endpoint="$HEAD_NODE:$RDZV_PORT"' in text and "scontrol show hostnames" in text
    assert "-m vla_scale.launch.agent" in text and f"-m vla_scale.cli train \"$CONFIG\" --resume auto" in text
    assert f"CONFIG={run}/slurm/config.yaml" in text
    assert "OMP_NUM_THREADS:-8" in text  # 32 CPUs over 4 ranks
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid bash, as a user would edit it
    assert not (tmp_path / "run").exists(), "a dry run must write nothing"


def test_chain_scripts_do_not_requeue_themselves(tmp_path):
    text = _dry(tmp_path, chain=3)
    assert "export VLA_SCALE_REQUEUE=0" in text and "export VLA_SCALE_REQUEUE=1" not in text


def test_cpu_cluster_ranks_come_from_procs_per_node(tmp_path):
    text = _dry(tmp_path, nodes=1, gpus_per_node=0, procs_per_node=2)
    assert "--nproc-per-node=2" in text and "--gpus-per-node" not in text


def test_cli_dry_run_prints_the_script(tmp_path, capsys):
    rc = main(["launch", "slurm", str(TINY_PRESET), f"run.output_dir={tmp_path / 'run'}", *DS,
               "--nodes", "1", "--gpus-per-node", "4", "--time", "1-00:00:00", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("#!/bin/bash") and "#SBATCH --time=1-00:00:00" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["1:00", "24h", "01:60:00", "00:00:61", "00:00:00", "1-2", "", "-01:00:00"])
def test_malformed_time_is_refused(text):
    with pytest.raises(LaunchError, match="--time"):
        parse_time(text)


def test_time_formats():
    assert parse_time("04:00:00") == 4 * 3600
    assert parse_time("2-01:00:30") == (49 * 60) * 60 + 30
    assert parse_time("100:00:00") == 100 * 3600


def _cli_error(capsys, tmp_path, *args: str) -> str:
    rc = main(["launch", "slurm", str(TINY_PRESET), f"run.output_dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, f"expected one line, got:\n{err}"
    assert not (tmp_path / "run").exists(), "nothing may be written when a check fails"
    return err


def test_no_sbatch_on_path_suggests_dry_run(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    err = _cli_error(capsys, tmp_path, *DS, "--nodes", "1", "--gpus-per-node", "4", "--time", "01:00:00")
    assert "sbatch is not on the PATH" in err and "--dry-run" in err


@pytest.mark.parametrize("args, expected", [
    (["--time", "90:00", "--gpus-per-node", "4"], "--time '90:00'"),
    (["train.strategy=single", "--nodes", "2", "--gpus-per-node", "4", "--time", "01:00:00"],
     "train.strategy=single trains in one process"),
    (["--gpus-per-node", "0", "--time", "01:00:00"], "--procs-per-node"),
    (["--gpus-per-node", "8", "--procs-per-node", "2", "--time", "01:00:00"], "contradicts --gpus-per-node 8"),
    (["--nodes", "0", "--time", "01:00:00"], "--nodes must be at least 1"),
    (["--time", "00:04:00", "--signal-lead", "300"], "--signal-lead 300s must be below the time limit"),
    (["--chain", "0", "--time", "01:00:00"], "--chain must be at least 1"),
])
def test_bad_launch_options_are_refused_before_submitting(tmp_path, capsys, args, expected):
    strategy = [] if any(a.startswith("train.strategy") for a in args) else ["train.strategy=deepspeed"]
    err = _cli_error(capsys, tmp_path, *strategy, "train.global_batch_size=64", "train.micro_batch_size=1", *args)
    assert expected in err


def test_a_batch_the_world_cannot_divide_names_the_nearest_settings(tmp_path, capsys):
    err = _cli_error(capsys, tmp_path, "train.strategy=deepspeed", "train.global_batch_size=256",
                     "train.micro_batch_size=32", "--nodes", "8", "--gpus-per-node", "8", "--time", "24:00:00")
    assert "train.global_batch_size=256 is not divisible by" in err and "on 64 rank(s)" in err
    assert "train.global_batch_size=2048" in err and "train.micro_batch_size=4" in err


def test_requeue_rules(tmp_path, monkeypatch):
    job = SlurmJob("42", restart_count=1)
    monkeypatch.delenv("VLA_SCALE_REQUEUE", raising=False)
    assert requeue_decision(tmp_path, None, 5, 10)[0] is False  # not in a SLURM job
    assert requeue_decision(tmp_path, job, 10, 10) == (False, "the run is finished (step 10 of 10)")
    assert requeue_decision(tmp_path, job, 5, 10)[0] is True
    record = tmp_path / REQUEUE_RECORD
    record.parent.mkdir()
    record.write_text('{"job_id": "42", "step": 5, "restart_count": 0}')
    again, why = requeue_decision(tmp_path, job, 5, 10)
    assert again is False and "no progress since job 42 was last requeued at step 5" in why
    assert requeue_decision(tmp_path, job, 6, 10)[0] is True  # progress since the last requeue
    assert requeue_decision(tmp_path, SlurmJob("43", 0), 5, 10)[0] is True  # another job's record
    monkeypatch.setenv("VLA_SCALE_REQUEUE", "0")
    assert "a job chain" in requeue_decision(tmp_path, job, 6, 10)[1]


def test_watch_records_a_real_signal_and_agrees(monkeypatch):
    watch = PreemptionWatch().install()
    try:
        summed = []

        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            summed.append(t.clone())
            return t

        assert watch.agreed(all_reduce_sum, torch.device("cpu")) is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == signal.SIGUSR1
        assert watch.agreed(all_reduce_sum, torch.device("cpu")) is True
        assert [float(t) for t in summed] == [0.0, 1.0]  # one collective per call, carrying the flag
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_slurm_job_from_env(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert SlurmJob.from_env() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert SlurmJob.from_env() == SlurmJob("7", 2)


def test_local_cluster_script_is_valid_bash():
    script = Path(__file__).resolve().parents[1] / "launch" / "slurm_local.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert shutil.which("bash")


# ------------------------------------------------------------------------------ the per-node agent

_WAITING_WORKER = '''
import os, pathlib, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
out = pathlib.Path(sys.argv[1])
(out / f"ready{os.environ['RANK']}").touch()
deadline = time.time() + float(sys.argv[2])
while not got and time.time() < deadline:
    time.sleep(0.05)
(out / f"got{os.environ['RANK']}").write_text(str(bool(got)))
'''


def _start_and_signal(tmp_path: Path, launcher: list[str], wait_s: float,
                      sig: signal.Signals = signal.SIGUSR1) -> tuple[int, str]:
    """Start 2 waiting workers under `launcher`, send `sig` to the launcher; its exit code and stderr."""
    from vla_scale.train.distributed import free_port

    worker = tmp_path / "worker.py"
    worker.write_text(_WAITING_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-m", *launcher, "--nproc-per-node=2", "--rdzv-backend=c10d",
                             f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(worker), str(tmp_path), str(wait_s)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for _ in range(600):
            if all((tmp_path / f"ready{r}").exists() for r in (0, 1)) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert all((tmp_path / f"ready{r}").exists() for r in (0, 1)), "the workers did not start"
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def test_agent_passes_usr1_to_every_worker_and_survives(tmp_path):
    rc, err = _start_and_signal(tmp_path, ["vla_scale.launch.agent"], wait_s=60)
    assert [(tmp_path / f"got{r}").read_text() for r in (0, 1)] == ["True", "True"], err[-2000:]
    assert rc == 0, err[-2000:]
    assert "SIGUSR1 forwarded to 2 worker(s)" in err


def test_plain_torchrun_dies_of_usr1(tmp_path):
    """Why the agent exists: torchrun has no SIGUSR1 handler, so the signal kills it and its workers hear nothing."""
    rc, _ = _start_and_signal(tmp_path, ["torch.distributed.run"], wait_s=3)
    assert rc == -signal.SIGUSR1
    deadline = time.time() + 30  # the orphaned workers give up after 3 s
    while not all((tmp_path / f"got{r}").exists() for r in (0, 1)) and time.time() < deadline:
        time.sleep(0.1)
    assert [(tmp_path / f"got{r}").read_text() for r in (0, 1)] == ["False", "False"]


def test_agent_ends_on_sigterm_in_one_line(tmp_path):
    """What a requeue or scancel does to each node's agent: its workers are stopped, no traceback in the log."""
    rc, err = _start_and_signal(tmp_path, ["vla_scale.launch.agent"], wait_s=60, sig=signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "Traceback" not in err, err[-2000:]
    assert not any((tmp_path / f"got{r}").exists() for r in (0, 1))  # the workers died of torchrun's SIGTERM
