"""SIGUSR1/SIGTERM stop a run at a step boundary with a checkpoint it resumes from exactly (one process).

Real signals, sent to this process at chosen moments (inside a step, inside a
checkpoint save) by wrapping the strategy's own methods. The multi-rank and
SLURM paths (the agreement collective over gloo, the requeue) run in
tests/test_slurm.py on a real cluster.
"""
from __future__ import annotations

import os
import signal

import pytest

from vla_scale.train.checkpoint import CheckpointManager
from vla_scale.train.metrics import read_metrics
from vla_scale.train.trainer import Trainer

STEPS = 6


@pytest.fixture(autouse=True)
def _outside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # a requeue is tested on the real cluster only


@pytest.fixture(scope="module")
def uninterrupted(tiny_llava, tmp_path_factory) -> dict[int, float]:
    from conftest import TINY_PRESET
    from vla_scale.config import load_config

    cfg = load_config(TINY_PRESET, [f"model.source={tiny_llava}", f"run.output_dir={tmp_path_factory.mktemp('ref')}",
                                    "train.progress=false", "train.tensorboard=false", "train.warmup_steps=1",
                                    f"train.steps={STEPS}", "train.checkpoint_every=0"])
    return Trainer(cfg).fit(resume="none").losses


def _signal_at(trainer: Trainer, method: str, sig: signal.Signals, when: int) -> None:
    """Send `sig` to this process in the middle of the `when`-th call of the strategy's `method`."""
    original = getattr(trainer.strategy, method)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if method == "save":
            original(*args, **kwargs)  # the strategy's files are written; COMPLETE and `latest` come after
            if calls["n"] == when:
                os.kill(os.getpid(), sig)
            return None
        if calls["n"] == when:
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    setattr(trainer.strategy, method, wrapped)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_in_a_step_checkpoints_that_step_and_resumes_exactly(tiny_config, uninterrupted, sig):
    cfg = tiny_config(f"train.steps={STEPS}", "train.checkpoint_every=0")
    trainer = Trainer(cfg)
    _signal_at(trainer, "train_step", sig, when=3)
    before = signal.getsignal(sig)
    first = trainer.fit(resume="auto")
    assert first.preempted and not first.requeued and sorted(first.losses) == [1, 2, 3]
    assert first.last_checkpoint == first.run_dir / "checkpoints" / "step_00000003"
    assert signal.getsignal(sig) == before  # the trainer's handlers are removed again
    second = Trainer(cfg).fit(resume="auto")
    assert not second.preempted and sorted(second.losses) == [4, 5, 6]
    assert {**first.losses, **second.losses} == uninterrupted  # bit-exact in fp32 on CPU
    rows = read_metrics(first.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_signal_during_a_save_is_handled_after_it(tiny_config, uninterrupted):
    cfg = tiny_config(f"train.steps={STEPS}", "train.checkpoint_every=2")
    trainer = Trainer(cfg)
    _signal_at(trainer, "save", signal.SIGUSR1, when=1)  # inside the save of step 2
    first = trainer.fit(resume="auto")
    # The save of step 2 ran to its end; the flag was agreed on after the next step, which saved and stopped.
    assert first.preempted and sorted(first.losses) == [1, 2, 3]
    root = first.run_dir / "checkpoints"
    manager = CheckpointManager(root)
    for step in (2, 3):
        manager.verify(root / f"step_0000000{step}")  # COMPLETE, every listed file present with its size
    assert manager.latest() == root / "step_00000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]  # no temp
    second = Trainer(cfg).fit(resume="auto")
    assert {**first.losses, **second.losses} == uninterrupted


def test_a_finished_run_ends_without_training(tiny_config):
    cfg = tiny_config("train.steps=2", "train.checkpoint_every=0")
    done = Trainer(cfg).fit(resume="auto")
    rows_before = (done.run_dir / "metrics.jsonl").read_text()
    again = Trainer(cfg)
    result = again.fit(resume="auto")  # what the next job of a chain does after the run has finished
    assert result.losses == {} and result.final_step == 2 and result.last_checkpoint == done.last_checkpoint
    assert not hasattr(again, "model"), "a finished run must not even build the model"
    assert (done.run_dir / "metrics.jsonl").read_text() == rows_before


# ------------------------------------------------------------------------------ two ranks, one signalled


def test_a_signal_to_one_rank_stops_both_at_the_same_step(tiny_llava, tmp_path):
    """Only rank 1 gets SIGUSR1 (2 DeepSpeed ranks under torchrun): the all-reduce makes rank 0 stop too,
    after the same step, with one complete checkpoint; `--resume auto` then gives an uninterrupted run's losses.
    Without the agreement, rank 0 would wait in the next step's collective for a peer that had left."""
    import subprocess
    import sys
    import time

    import psutil

    from conftest import TINY_PRESET
    from vla_scale.train.distributed import free_port

    steps = 20
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               VLA_SCALE_DIST_TIMEOUT_S="120", TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR")
               or str(tmp_path / "torch_extensions"))

    def train(run: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "vla_scale.cli", "train", str(TINY_PRESET),
             f"model.source={tiny_llava}", f"run.output_dir={tmp_path / run}", f"train.steps={steps}",
             "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2",
             "train.checkpoint_every=1000", "train.progress=false", "train.tensorboard=false",
             "train.strategy=deepspeed", "deepspeed.stage3_param_persistence_threshold=1000",
             "train.hang_timeout_s=120"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def finish(proc: subprocess.Popen) -> str:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            pytest.fail(f"timed out:\n{err[-3000:]}")
        return err

    def losses(run: str) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl")}

    err = finish(train("reference"))
    reference = losses("reference")
    assert sorted(reference) == list(range(1, steps + 1)), err[-3000:]

    proc = train("run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, "the run ended before it was signalled"
        time.sleep(0.1)
    rank1 = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGUSR1)
    err = finish(proc)
    root = tmp_path / "run" / "checkpoints"
    stopped = sorted(losses("run"))[-1]
    assert stopped < steps, f"the run was not stopped:\n{err[-3000:]}"
    assert (root / "latest").read_text().strip() == f"step_{stopped:08d}"
    CheckpointManager(root).verify(root / f"step_{stopped:08d}")
    assert [p.name for p in root.glob("step_*")] == [f"step_{stopped:08d}"]

    err = finish(train("run"))  # the same command again: --resume auto
    assert losses("run") == reference, err[-3000:]
