"""DeepSpeed ZeRO-3 on 2 CPU ranks: what a user relies on when training at scale.

Multi-rank properties are checked on real `torchrun` processes over gloo
(tests/workers/ds_worker.py writes what they assert on). The runs are shared
between tests through module-scoped fixtures:

    single_ref      SingleProcessStrategy, in this process: the numerical reference
    ds_run          2 ranks, 6 steps, checkpoints at 2/4/6           (worker)
    killed_run      2 ranks, rank 1 dies inside the save of step 4, then
                    `torchrun -m vla_scale.cli train --resume auto`   (worker, then the CLI)
    elastic_run     torchrun --max-restarts 1: rank 1 crashes at step 3 (worker)
    shrunk_run      ds_run's checkpoints, step 6 damaged, resumed by a plain
                    `python -m vla_scale.cli train` on 1 rank (2 -> 1, universal)
    grown_run       shrunk_run's 1-rank step 5, resumed on 2 ranks (1 -> 2, universal)
    nan_skip_run / nan_stop_run   a NaN loss on rank 1 only at step 3

About 2 minutes on 2 cores, plus ~16 s once for DeepSpeed's JIT build of its
shared-memory comm op (cached in TORCH_EXTENSIONS_DIR for the session).

Tolerances: per-step losses of the DeepSpeed run and the single-process run
on the same global batch differ only by float summation order (partial
gradient sums per rank, the loss all-reduce): ~1e-7 measured, 1e-5 asserted
(fp32). The same bound holds across a world-size change: the universal
conversion itself is exact (fp32 weights and Adam moments are copied), only
the reduction order changes from there on. Resume on the same world size and
the elastic restart are bit-exact.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import REPO, TINY_PRESET
from vla_scale.config import load_config
from vla_scale.errors import CheckpointError, ConfigError
from vla_scale.train.checkpoint import CheckpointManager
from vla_scale.train.distributed import free_port
from vla_scale.train.metrics import read_metrics

WORKER = REPO / "tests" / "workers" / "ds_worker.py"
TIMEOUT_S = 300
EXIT_ABORT = "terminate called without an active exception"  # rare DeepSpeed abort at exit (MACHINE.md)
STEPS = 6
# The settings every run here shares (the single-process reference too): 4 micro-batches of 2 per
# step, i.e. 2 accumulation steps per rank on 2 ranks; weight decay on, so the optimizer's two
# parameter groups differ; a small persistence threshold so that most parameters are really
# gathered and released around each module (the tiny model's tensors are all under the default).
COMMON = [
    f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2",
    "train.weight_decay=0.1", "train.checkpoint_every=2", "train.keep_last_k=3", "train.progress=false",
    "train.tensorboard=false",
]
DS = ["train.strategy=deepspeed", "deepspeed.stage3_param_persistence_threshold=1000", "train.hang_timeout_s=120"]


# --------------------------------------------------------------------------- launching


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory) -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))


@pytest.fixture(scope="module")
def ds_env(torch_extensions_dir) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCH_EXTENSIONS_DIR=torch_extensions_dir, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore::FutureWarning", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLA_SCALE_DIST_TIMEOUT_S="120", PYTHONPATH=str(REPO / "tests"))
    return env


def _tail(text: str, n: int = 40) -> str:
    """The end of a run's stderr; the workers' own lines ("[rankN]: ...") first, torchrun's summary is noise."""
    lines = (text or "").strip().splitlines()
    ranks = [line for line in lines if line.startswith("[rank") or line.startswith("[test fault]")]
    return "\n".join((ranks or lines)[-n:])


def _run(cmd: list[str], env: dict[str, str], timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on timeout kill that group (torchrun's workers included)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... timed out after {timeout}s:\n{_tail(err)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            *args]


def _run_until_written(cmd: list[str], env: dict[str, str], written: Callable[[], bool],
                       reset: Callable[[], None]) -> subprocess.CompletedProcess:
    """Run; success is judged by what the run wrote. One retry, only for DeepSpeed's known exit abort."""
    for attempt in (1, 2):
        r = _run(cmd, env)
        if written():
            return r
        if attempt == 1 and EXIT_ABORT in r.stderr:
            reset()
            continue
        pytest.fail(f"run failed (exit {r.returncode}), outputs missing:\n{_tail(r.stderr)}")
    raise AssertionError("unreachable")


def _worker_run(env: dict[str, str], nproc: int, out: Path, run_dir: Path, source: Path, *overrides: str,
                extra_env: dict[str, str] | None = None, max_restarts: int = 0,
                expect_reports: bool = True) -> subprocess.CompletedProcess:
    cmd = _torchrun(nproc, str(WORKER), str(out), str(TINY_PRESET), f"model.source={source}",
                    f"run.output_dir={run_dir}", *COMMON, *DS, *overrides, max_restarts=max_restarts)
    full_env = {**env, **(extra_env or {})}
    if not expect_reports:
        return _run(cmd, full_env)

    def reset() -> None:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)

    return _run_until_written(cmd, full_env, lambda: all((out / f"report_rank{r}.json").is_file()
                                                          for r in range(nproc)), reset)


def _reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("report_rank*.json"))]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl has repeated or unordered steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


# --------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds")


@pytest.fixture(scope="module")
def single_ref(tiny_llava, work) -> dict[int, float]:
    from vla_scale.train.trainer import Trainer

    cfg = load_config(TINY_PRESET, [f"model.source={tiny_llava}", f"run.output_dir={work / 'single'}", *COMMON])
    return Trainer(cfg).fit(resume="none").losses


@pytest.fixture(scope="module")
def ds_run(ds_env, tiny_llava, work) -> dict:
    out, run = work / "ds_out", work / "ds_run"
    _worker_run(ds_env, 2, out, run, tiny_llava)
    return {"out": out, "run": run, "reports": _reports(out), "losses": _losses(run)}


@pytest.fixture(scope="module")
def killed_run(ds_env, tiny_llava, work) -> dict:
    out, run = work / "killed_out", work / "killed_run"
    marker = work / "killed.marker"
    first = _worker_run(ds_env, 2, out, run, tiny_llava, expect_reports=False,
                        extra_env={"VLA_SCALE_TEST_KILL_IN_SAVE_AT_STEP": "4",
                                   "VLA_SCALE_TEST_FAULT_MARKER": str(marker)})
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    latest = CheckpointManager(run / "checkpoints").latest()
    # Resumed by the user-facing command: torchrun -m vla_scale.cli train ... --resume auto.
    cmd = _torchrun(2, "-m", "vla_scale.cli", "train", str(TINY_PRESET), f"model.source={tiny_llava}",
                    f"run.output_dir={run}", *COMMON, *DS, "--resume", "auto")
    final = run / "checkpoints" / "step_00000006"
    second = _run_until_written(cmd, ds_env, lambda: CheckpointManager(run / "checkpoints").latest() == final,
                                lambda: None)
    return {"first": first, "marker": marker, "ckpts_after_kill": ckpts, "latest_after_kill": latest,
            "second": second, "run": run}


@pytest.fixture(scope="module")
def elastic_run(ds_env, tiny_llava, work) -> dict:
    out, run = work / "elastic_out", work / "elastic_run"
    marker = work / "elastic.marker"
    r = _worker_run(ds_env, 2, out, run, tiny_llava, max_restarts=1,
                    extra_env={"VLA_SCALE_TEST_CRASH_AT_STEP": "3", "VLA_SCALE_TEST_FAULT_MARKER": str(marker)})
    return {"proc": r, "marker": marker, "reports": _reports(out), "losses": _losses(run)}


@pytest.fixture(scope="module")
def shrunk_run(ds_env, tiny_llava, work, ds_run) -> dict:
    """ds_run's checkpoints resumed on ONE rank by a plain `vla-scale train` (no launcher), via --resume auto."""
    run = work / "shrunk_run"
    shutil.copytree(ds_run["run"], run)  # checkpoints and metrics.jsonl
    damaged = run / "checkpoints" / "step_00000006" / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a truncated shard: --resume auto must fall back to step 4
    cmd = [sys.executable, "-m", "vla_scale.cli", "train", str(TINY_PRESET), f"model.source={tiny_llava}",
           f"run.output_dir={run}", *COMMON, *DS, "train.checkpoint_every=1", "--resume", "auto"]
    final = run / "checkpoints" / "step_00000006"

    def written() -> bool:
        return (final / "latest").is_file() and CheckpointManager(run / "checkpoints").latest() == final

    r = _run_until_written(cmd, ds_env, written, lambda: None)
    return {"proc": r, "run": run, "losses": _losses(run)}


@pytest.fixture(scope="module")
def grown_run(ds_env, tiny_llava, work, shrunk_run) -> dict:
    """shrunk_run's 1-rank checkpoint of step 5 resumed on TWO ranks."""
    out, run = work / "grown_out", work / "grown_run"
    step5 = shrunk_run["run"] / "checkpoints" / "step_00000005"
    _worker_run(ds_env, 2, out, run, tiny_llava, extra_env={"VLA_SCALE_TEST_RESUME": str(step5)})
    return {"run": run, "reports": _reports(out), "losses": _losses(run)}


@pytest.fixture(scope="module")
def nan_skip_run(ds_env, tiny_llava, work) -> dict:
    out, run = work / "nan_skip_out", work / "nan_skip_run"
    _worker_run(ds_env, 2, out, run, tiny_llava, "train.on_nonfinite=skip",
                extra_env={"VLA_SCALE_TEST_NAN_AT_STEP": "3"})
    return {"run": run, "reports": _reports(out), "rows": read_metrics(run / "metrics.jsonl")}


@pytest.fixture(scope="module")
def nan_stop_run(ds_env, tiny_llava, work) -> dict:
    out, run = work / "nan_stop_out", work / "nan_stop_run"
    # checkpoint_every=4: the step-2 checkpoint below can only come from the stop path.
    r = _worker_run(ds_env, 2, out, run, tiny_llava, "train.on_nonfinite=stop", "train.checkpoint_every=4",
                    extra_env={"VLA_SCALE_TEST_NAN_AT_STEP": "3"}, expect_reports=False)
    return {"proc": r, "out": out, "run": run}


# --------------------------------------------------------------------------- ZeRO-3 state


@pytest.mark.slow
def test_frozen_encoder_stays_out_of_zero3_and_the_optimizer(ds_run):
    for report in ds_run["reports"]:
        assert report["frozen"], "the tiny siamese model has a frozen encoder"
        for p in report["frozen"]:
            assert p["zero_attrs"] == [], f"{p['name']} carries ZeRO-3 attributes {p['zero_attrs']}"
            assert not p["requires_grad"] and not p["in_optimizer"], p["name"]
        assert not any(t["name"].startswith("encoders.siglip_frozen") for t in report["trainable"])


@pytest.mark.slow
def test_every_trainable_parameter_is_partitioned_over_the_two_ranks(ds_run):
    r0, r1 = ds_run["reports"]
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    assert [t["name"] for t in r0["trainable"]] == [t["name"] for t in r1["trainable"]]
    for a, b in zip(r0["trainable"], r1["trainable"]):
        n = a["ds_numel"]
        # Each rank holds ceil(n / 2) elements (DeepSpeed pads the last partition): never the whole tensor.
        assert a["partition_numel"] == b["partition_numel"] == (n + 1) // 2, a["name"]
        assert a["partition_numel"] < n or n == 1, a["name"]
    assert any(not t["persist"] for t in r0["trainable"]), "some parameters must be gathered and released"


@pytest.mark.slow
def test_optimizer_state_is_exactly_the_trainable_parameters_split_over_ranks(ds_run, tiny_llava):
    from vla_scale.models.loading import build_vla

    model, _ = build_vla(load_config(TINY_PRESET, [f"model.source={tiny_llava}"]).model)
    trainable = model.trainable_parameter_count()
    frozen = model.frozen_parameter_count()
    assert frozen > 0
    per_rank = []
    for report in ds_run["reports"]:
        opt = report["optimizer"]
        partitions = sum(t["partition_numel"] for t in report["trainable"])
        # fp32 master weights, exp_avg and exp_avg_sq: one element per element of this rank's partitions.
        assert opt["master_numel"] == opt["exp_avg_numel"] == opt["exp_avg_sq_numel"] == partitions
        per_rank.append(opt["exp_avg_numel"] + opt["exp_avg_sq_numel"])
    assert sum(t["ds_numel"] for t in ds_run["reports"][0]["trainable"]) == trainable
    padding = sum(t["ds_numel"] % 2 for t in ds_run["reports"][0]["trainable"])
    assert sum(per_rank) == 2 * (trainable + padding)  # Adam: 2 moments per trainable element, none for frozen
    assert per_rank[0] == per_rank[1]


@pytest.mark.slow
def test_losses_match_a_single_process_run_on_the_same_global_batch(ds_run, single_ref):
    losses = ds_run["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, ref in single_ref.items():
        assert losses[step] == pytest.approx(ref, abs=1e-5), step
    assert losses[STEPS] < losses[1]  # it trains
    for report in ds_run["reports"]:  # every rank sees the global loss
        assert {int(k): v for k, v in report["losses"].items()} == losses


# --------------------------------------------------------------------------- checkpoints and export


@pytest.mark.slow
@pytest.mark.slow
def test_two_ranks_give_the_gradients_and_parameters_of_one_process_on_the_same_global_batch(ds_env, tiny_llava,
                                                                                            work):
    """2 ranks x micro-batch 4 under ZeRO-3 against 1 process x micro-batch 8 (tests/test_objective.py has the
    accumulation splits): the objective is the global batch's answer-token mean, whatever the world size."""
    from test_objective import STEPS, _run, assert_same_step

    # Validation at the last step too: under ZeRO-3 every rank gathers the model and decodes.
    val = [f"train.val_every={STEPS}", "data.val_samples=4",
           "data.val_sources=[{name: robot, path: synthetic}, {name: vqa, path: synthetic}]"]
    ref_grads, ref_params, _ = _run(tiny_llava, work / "objective_ref", 8, *val)
    out, run = work / "objective_out", work / "objective_run"
    _worker_run(ds_env, 2, out, run, tiny_llava, f"train.steps={STEPS}", "train.micro_batch_size=4",
                "train.warmup_steps=1", "train.checkpoint_every=0", *val, extra_env={"VLA_SCALE_TEST_GRADS": "1"})
    grads = torch.load(out / "grads_step1.pt", weights_only=True)
    params = torch.load(out / "core_state.pt", weights_only=True)
    assert_same_step(grads, params, ref_grads, ref_params)
    ref_val = {k: v for k, v in read_metrics(work / "objective_ref" / "metrics.jsonl")[-1].items() if "val/" in k}
    ds_val = {k: v for k, v in read_metrics(run / "metrics.jsonl")[-1].items() if "val/" in k}
    assert "val/l1/robot" in ref_val and ref_val.keys() == ds_val.keys()
    for key, value in ref_val.items():  # the weights agree to ~1e-7: losses closely, decoded actions exactly
        assert ds_val[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if "loss" in key else value), key


def test_checkpoint_is_deepspeeds_layout_and_zero_to_fp32_consolidates_it(ds_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = ds_run["run"] / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004", "step_00000006"]
    step = root / "step_00000006"
    listing = CheckpointManager(root).verify(step)["files"]
    for rel in ("latest", "zero_to_fp32.py", "global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_rank0.pt",
                "rng_state_rank1.pt", "data_state.json", "config.yaml", "frozen_encoders.json", "metadata.json"):
        assert rel in listing, rel  # COMPLETE covers DeepSpeed's own files too
    assert (step / "latest").read_text().strip() == "global_step6"
    meta = json.loads((step / "metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 6 and meta["strategy"] == "deepspeed"
    assert meta["samples"] == 8 * STEPS
    frozen = json.loads((step / "frozen_encoders.json").read_text())
    assert set(frozen) == {"siglip_frozen"} and len(frozen["siglip_frozen"]["sha256"]) == 64

    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(step))  # DeepSpeed's own tool, unchanged
    trained = torch.load(ds_run["out"] / "core_state.pt")
    assert not any(k.startswith("encoders.siglip_frozen") for k in consolidated)  # not re-saved
    params = {k for k in trained if not k.endswith("position_ids")}
    assert params <= set(consolidated)
    for key in params:
        torch.testing.assert_close(consolidated[key], trained[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_export_of_a_zero3_checkpoint_computes_what_the_model_in_training_computed(ds_run, tmp_path):
    from vla_scale.models.export import load_export
    from vla_scale.train.export import export_checkpoint

    probe = torch.load(ds_run["out"] / "probe.pt")
    step = ds_run["run"] / "checkpoints" / "step_00000006"
    for dtype, tol in (("fp32", 1e-5), ("bf16", 5e-2)):
        out = export_checkpoint(step, tmp_path / dtype, dtype=dtype)
        model, _, _, config = load_export(out)
        assert config["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        with torch.no_grad():
            got = model(probe["batch"])
        torch.testing.assert_close(got.sample_loss_sum.float(), probe["sample_loss_sum"], rtol=tol, atol=tol)


@pytest.mark.slow
def test_damaged_deepspeed_shard_is_named_and_the_latest_good_checkpoint_is_used(ds_run, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(ds_run["run"] / "checkpoints", root)
    shard = root / "step_00000006" / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"garbage")
    manager = CheckpointManager(root)
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        manager.verify(root / "step_00000006")
    with pytest.warns(UserWarning, match="step_00000006"):
        assert manager.latest() == root / "step_00000004"


# --------------------------------------------------------------------------- crashes, resume, elastic


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_resume_is_bit_exact(killed_run, ds_run):
    first = killed_run["first"]
    assert first.returncode != 0 and killed_run["marker"].is_file(), _tail(first.stderr)
    assert "dies inside the save of step 4" in first.stderr
    # The half-written step 4 never got a checkpoint name; latest still names step 2.
    assert "step_00000004" not in killed_run["ckpts_after_kill"]
    assert killed_run["latest_after_kill"].name == "step_00000002"
    # `torchrun -m vla_scale.cli train --resume auto` continues from step 2 ...
    assert json.loads(killed_run["second"].stdout.strip().splitlines()[-1])["checkpoint"].endswith("step_00000006")
    losses = _losses(killed_run["run"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ds_run["losses"]  # ... with exactly the uninterrupted run's losses (fp32 on CPU)
    assert not any(".tmp-" in p.name for p in (killed_run["run"] / "checkpoints").iterdir())


@pytest.mark.slow
def test_an_elastic_restart_after_a_rank_crash_resumes_with_the_same_losses(elastic_run, ds_run):
    assert elastic_run["marker"].is_file(), "the crash was not injected"
    assert "crashes at the start of step 3" in elastic_run["proc"].stderr
    assert [r["restart_count"] for r in elastic_run["reports"]] == [1, 1]  # the second attempt finished
    assert sorted(int(k) for k in elastic_run["reports"][0]["losses"]) == [3, 4, 5, 6]  # resumed from step 2
    assert elastic_run["losses"] == ds_run["losses"]


@pytest.mark.slow
def test_two_ranks_to_one_through_a_universal_checkpoint(shrunk_run, ds_run):
    err = shrunk_run["proc"].stderr
    # --resume auto skipped the damaged step 6 (named), and converted the 2-rank step 4.
    assert "step_00000006" in err and "falling back to" in err and "step_00000004" in err
    assert "was written by 2 ranks, this run has 1" in err
    losses = shrunk_run["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in (1, 2, 3, 4):  # copied history, kept
        assert losses[step] == ds_run["losses"][step]
    for step in (5, 6):
        assert losses[step] == pytest.approx(ds_run["losses"][step], abs=1e-5), step
    root = shrunk_run["run"] / "checkpoints"
    assert json.loads((root / "step_00000006" / "metadata.json").read_text())["world_size"] == 1
    # The data order is kept: the loader's position after step 6 is the 2-rank run's.
    assert (json.loads((root / "step_00000006" / "data_state.json").read_text())
            == json.loads((ds_run["run"] / "checkpoints" / "step_00000006" / "data_state.json").read_text()))
    assert not (shrunk_run["run"] / "universal_tmp").exists()  # the conversion is not left behind


@pytest.mark.slow
def test_one_rank_to_two_through_a_universal_checkpoint(grown_run, ds_run):
    assert sorted(int(k) for k in grown_run["reports"][0]["losses"]) == [6]
    assert grown_run["losses"][6] == pytest.approx(ds_run["losses"][6], abs=1e-5)
    assert [r["world_size"] for r in grown_run["reports"]] == [2, 2]
    assert all(r["optimizer"]["adam_steps"] == [6.0, 6.0] for r in grown_run["reports"])


# --------------------------------------------------------------------------- non-finite loss


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_skips_that_step_on_every_rank(nan_skip_run):
    from vla_scale.train.schedule import lr_lambda

    rows = {r["step"]: r for r in nan_skip_run["rows"]}
    assert rows[3]["skipped"] == 1.0 and rows[3]["loss"] is None  # NaN is logged as null
    assert all(rows[s]["skipped"] == 0.0 and rows[s]["loss"] is not None for s in (1, 2, 4, 5, 6))
    for report in nan_skip_run["reports"]:
        assert report["nonfinite_steps"] == 1 and report["global_steps"] == STEPS
        assert report["optimizer"]["adam_steps"] == [STEPS - 1.0] * 2  # the skipped step updated nothing
    # The LR is still a function of the step number (as in the single-process strategy).
    base = load_config(TINY_PRESET, COMMON).train.lr
    assert rows[4]["lr"] == pytest.approx(base * lr_lambda(3, warmup_steps=2, total_steps=STEPS))


@pytest.mark.slow
def test_a_nan_loss_with_on_nonfinite_stop_saves_the_last_good_step_and_stops(nan_stop_run, ds_run):
    r = nan_stop_run["proc"]
    assert r.returncode != 0
    errors = [p.read_text() for p in sorted(nan_stop_run["out"].glob("error_rank*.txt"))]
    assert len(errors) == 2 and all("non-finite" in e for e in errors), _tail(r.stderr)
    root = nan_stop_run["run"] / "checkpoints"
    assert CheckpointManager(root).latest() == root / "step_00000002"
    # Saved with the data position before step 3, so a resume retries that step.
    assert (json.loads((root / "step_00000002" / "data_state.json").read_text())
            == json.loads((ds_run["run"] / "checkpoints" / "step_00000002" / "data_state.json").read_text()))


# --------------------------------------------------------------------------- configuration (no processes)


def _cfg(tmp_path, *overrides):
    return load_config(TINY_PRESET, [f"run.output_dir={tmp_path}", *overrides])


def test_the_deepspeed_config_is_generated_from_the_typed_config(tmp_path):
    from vla_scale.train.deepspeed_strategy import build_deepspeed_config

    cfg = _cfg(tmp_path, "train.global_batch_size=32", "train.micro_batch_size=4", "train.grad_clip=0.5",
               "deepspeed.reduce_bucket_size=1000", "deepspeed.stage3_prefetch_bucket_size=2000")
    ds = build_deepspeed_config(cfg, world_size=2, device=torch.device("cpu"))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (32, 4, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}  # fp32 on CPU
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 1000 and z["stage3_prefetch_bucket_size"] == 2000
    assert z["overlap_comm"] and z["contiguous_gradients"] and "optimizer" not in ds and "scheduler" not in ds
    assert build_deepspeed_config(cfg, 2, torch.device("cuda"))["bf16"] == {"enabled": True}
    assert build_deepspeed_config(_cfg(tmp_path, "model.precision=bf16"), 1, torch.device("cpu"))["bf16"]["enabled"]


def test_a_users_deepspeed_json_wins_except_where_the_loop_owns_the_value(tmp_path):
    from vla_scale.train.deepspeed_strategy import build_deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": False, "sub_group_size": 1000},
                                "communication_data_type": "fp32", "train_batch_size": "auto"}))
    ds = build_deepspeed_config(_cfg(tmp_path, f"deepspeed.config_file={user}"), 1, torch.device("cpu"))
    z = ds["zero_optimization"]
    assert z["overlap_comm"] is False and z["sub_group_size"] == 1000 and z["stage"] == 3  # merged, theirs win
    assert ds["communication_data_type"] == "fp32" and ds["train_batch_size"] == 8
    for bad, named in (({"train_batch_size": 64}, "train.global_batch_size"),
                       ({"optimizer": {"type": "Adam"}}, "train.lr"),
                       ({"zero_optimization": {"stage": 2}}, "stage"),
                       ({"fp16": {"enabled": True}}, "model.precision=bf16")):
        user.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=named):
            build_deepspeed_config(_cfg(tmp_path, f"deepspeed.config_file={user}"), 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="ZeRO-3 only"):
        build_deepspeed_config(_cfg(tmp_path, "deepspeed.stage=2"), 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="not divisible"):
        build_deepspeed_config(_cfg(tmp_path, "train.micro_batch_size=8"), 2, torch.device("cpu"))


def test_bf16_gradients_are_accumulated_and_reduce_scattered_in_fp32_unless_configured(tmp_path):
    from vla_scale.train.deepspeed_strategy import build_deepspeed_config, numerics_line

    ds = build_deepspeed_config(_cfg(tmp_path, "model.precision=bf16"), 1, torch.device("cpu"))
    assert ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    assert "accumulated in fp32 and reduce-scattered in fp32" in numerics_line(ds)
    ds = build_deepspeed_config(_cfg(tmp_path, "model.precision=bf16", "deepspeed.grad_accum_dtype=bf16",
                                     "deepspeed.communication_data_type=bf16"), 1, torch.device("cpu"))
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and ds["communication_data_type"] == "bf16"
    assert "accumulated in bf16 and reduce-scattered in bf16" in numerics_line(ds)
    fp32 = build_deepspeed_config(_cfg(tmp_path, "deepspeed.communication_data_type=bf16"), 1, torch.device("cpu"))
    assert fp32["data_types"] == {"grad_accum_dtype": "fp32"} and fp32["communication_data_type"] == "fp32"
    with pytest.raises(ConfigError, match="deepspeed.grad_accum_dtype"):
        _cfg(tmp_path, "deepspeed.grad_accum_dtype=fp8")


@pytest.mark.slow
def test_a_bf16_run_on_two_ranks_accumulates_and_reduces_gradients_in_fp32(ds_env, tiny_llava, tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    _worker_run(ds_env, 2, out, run, tiny_llava, "model.precision=bf16", "train.steps=3")
    reports = _reports(out)
    assert len(reports) == 2
    for rep in reports:
        assert rep["numerics"] == {"param_dtype": "torch.bfloat16", "grad_accum_dtype": "torch.float32",
                                   "grad_buffer_dtype": "torch.float32", "communication_data_type": "torch.float32"}
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert reports[0]["losses"] == reports[1]["losses"]  # every rank logs the same global loss


def test_a_single_process_gets_a_world_of_one_and_a_partial_launch_env_is_an_error(monkeypatch):
    from vla_scale.train.distributed import ensure_launch_env

    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in launch_vars})
    assert ensure_launch_env() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    assert ensure_launch_env() is False  # a launcher's (here: our own) values are kept
    del os.environ["MASTER_ADDR"]
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        ensure_launch_env()


def test_an_unknown_strategy_is_a_config_error(tmp_path):
    from vla_scale.train.strategies import make_strategy

    cfg = _cfg(tmp_path)
    cfg.train.strategy = "fsdp"  # past validation, as a programmatic caller could
    with pytest.raises(ConfigError, match="fsdp"):
        make_strategy(cfg)

