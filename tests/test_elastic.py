"""Multi-node elastic restarts: two torchrun agents (two "nodes") on this machine, DeepSpeed ZeRO-3 over gloo.

    uninterrupted   2 agents x 1 worker, 6 steps, checkpoints at 2/4/6
    restarted       the same with --max-restarts=1; rank 1 exits at the start of step 3 on the
                    first attempt (tests/workers/ds_worker.py's fault hook): its agent restarts it,
                    the other agent sees a node waiting and restarts its own worker, and both
                    resume from the step-2 checkpoint

Both runs use TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, the supported multi-node
route (vla_scale.train.distributed); a multi-node run on torchrun's shared
agent store is refused at start. The agents rendezvous over c10d on a free
port; with both on 127.0.0.1 the first one to bind hosts the rendezvous
store, the other joins it as a client. Each agent runs in its own mount
namespace with a private /dev/shm, as on two machines: mosaicml-streaming's
local leaders (local rank 0 of each node) register their shared memory there
and would collide in one /dev/shm (`unshare --mount`, root; skipped with that
reason where it is not allowed). benchmarks/elastic_restarts.py repeats the
restarted run to measure its success rate (BENCHMARKS.md).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_PRESET
from test_deepspeed import COMMON, DS, EXIT_ABORT, TIMEOUT_S, WORKER, _losses, _reports, _tail
from test_deepspeed import ds_env, torch_extensions_dir  # noqa: F401  (fixtures)
from vla_scale.errors import ConfigError
from vla_scale.train.distributed import SLURM_HANG_TIMEOUT_S, check_elastic_store, free_port, resolve_hang_timeout

NODES = 2


# Runs the command after it with a /dev/shm of its own (a "node" of its own for shared memory).
PRIVATE_SHM = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o size=2g tmpfs /dev/shm && exec "$@"', "node"]


def private_shm_available() -> bool:
    try:
        return subprocess.run([*PRIVATE_SHM, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def two_node_command(out: Path, run: Path, source: Path, *overrides: str, port: int, run_id: str,
                     max_restarts: int) -> list[str]:
    """One agent's torchrun command line (the same on both "nodes")."""
    return [*PRIVATE_SHM, sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc-per-node=1",
            f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={run_id}", str(WORKER), str(out), str(TINY_PRESET), f"model.source={source}",
            f"run.output_dir={run}", *COMMON, *DS, *overrides]


def run_two_nodes(env: dict[str, str], out: Path, run: Path, source: Path, *overrides: str,
                  max_restarts: int = 0, timeout: float = TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Start two agents, wait for both (killing both process groups on timeout), return their results."""
    cmd = two_node_command(out, run, source, *overrides, port=free_port(), run_id=secrets.token_hex(4),
                           max_restarts=max_restarts)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(NODES)]
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            tails = "\n---\n".join(_tail(q.communicate()[1]) for q in procs)
            pytest.fail(f"two-node run timed out after {timeout}s:\n{tails}")
        results.append(subprocess.CompletedProcess(cmd, p.returncode, o, e))
    return results


def run_two_nodes_until_written(env: dict[str, str], out: Path, run: Path, source: Path, *overrides: str,
                                max_restarts: int = 0) -> list[subprocess.CompletedProcess]:
    """Success is judged by the reports both workers wrote; one retry only for DeepSpeed's exit abort."""
    for attempt in (1, 2):
        results = run_two_nodes(env, out, run, source, *overrides, max_restarts=max_restarts)
        if all((out / f"report_rank{r}.json").is_file() for r in range(NODES)):
            return results
        if attempt == 1 and any(EXIT_ABORT in r.stderr for r in results):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
            continue
        pytest.fail("two-node run failed (exits " + ", ".join(str(r.returncode) for r in results) + "):\n"
                    + "\n---\n".join(_tail(r.stderr) for r in results))
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def two_nodes_possible() -> None:
    if not private_shm_available():
        pytest.skip("two nodes on one machine need a private /dev/shm per node (`unshare --mount`, as root)")


@pytest.fixture(scope="module")
def multi_node_env(ds_env, two_nodes_possible) -> dict[str, str]:  # noqa: F811
    return {**ds_env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(scope="module")
def uninterrupted(multi_node_env, tiny_llava, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("two_nodes")
    out, run = work / "out", work / "run"
    run_two_nodes_until_written(multi_node_env, out, run, tiny_llava)
    return {"reports": _reports(out), "losses": _losses(run)}


@pytest.fixture(scope="module")
def restarted(multi_node_env, tiny_llava, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("two_nodes_restarted")
    out, run, marker = work / "out", work / "run", work / "fault.marker"
    env = {**multi_node_env, "VLA_SCALE_TEST_CRASH_AT_STEP": "3", "VLA_SCALE_TEST_FAULT_MARKER": str(marker)}
    results = run_two_nodes_until_written(env, out, run, tiny_llava, max_restarts=1)
    return {"results": results, "marker": marker, "reports": _reports(out), "losses": _losses(run)}


@pytest.mark.slow
def test_two_nodes_restart_after_a_worker_dies_and_finish_with_the_losses_of_an_uninterrupted_run(
        restarted, uninterrupted):
    assert restarted["marker"].is_file(), "the fault was not injected"
    assert any("crashes at the start of step 3" in r.stderr for r in restarted["results"])
    # Both agents restarted their worker: each node's final worker is a new process that resumed
    # from the step-2 checkpoint and trained steps 3..6.
    assert [sorted(int(k) for k in rep["losses"]) for rep in restarted["reports"]] == [[3, 4, 5, 6]] * NODES
    assert [rep["world_size"] for rep in restarted["reports"]] == [NODES] * NODES
    assert sorted(uninterrupted["losses"]) == [1, 2, 3, 4, 5, 6]
    assert restarted["losses"] == uninterrupted["losses"]  # bit-exact: a resume on the same world size is


@pytest.mark.slow
def test_two_nodes_on_torchruns_shared_store_are_refused_at_start_with_what_to_set(ds_env, tiny_llava,  # noqa: F811
                                                                                   tmp_path, two_nodes_possible):
    env = {k: v for k, v in ds_env.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    out, run = tmp_path / "out", tmp_path / "run"
    results = run_two_nodes(env, out, run, tiny_llava, timeout=180)
    # Every node fails and nothing trains. The refusal names what to set on the node(s) whose worker got
    # to it: a node whose agent is torn down by the other node's exit (its rendezvous host left) never
    # reaches the check, which happens when its worker is still importing (seen under load in CI).
    assert all(r.returncode != 0 for r in results)
    named = [r for r in results if "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in r.stderr]
    assert named, "\n---\n".join(r.stderr[-2000:] for r in results)
    assert not list(out.glob("report_rank*.json")) and not (run / "checkpoints").exists()


def test_the_shared_store_is_refused_only_with_several_nodes():
    torchrun = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}
    check_elastic_store({**torchrun, "GROUP_WORLD_SIZE": "1"})  # one agent: per-attempt prefix store
    check_elastic_store({**torchrun, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "False"})
    check_elastic_store({})  # no torchrun (srun, a plain process)
    with pytest.raises(ConfigError, match="2 nodes.*TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_elastic_store({**torchrun, "GROUP_WORLD_SIZE": "2"})


def test_the_hang_watchdog_is_on_under_slurm_unless_configured():
    assert resolve_hang_timeout(None, {"SLURM_JOB_ID": "42"}) == SLURM_HANG_TIMEOUT_S == 1200.0
    assert resolve_hang_timeout(None, {}) == 0.0
    assert resolve_hang_timeout(0.0, {"SLURM_JOB_ID": "42"}) == 0.0  # switched off explicitly
    assert resolve_hang_timeout(90, {}) == 90.0
