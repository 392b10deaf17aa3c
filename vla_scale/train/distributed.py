"""The process group of a training run: launcher environment, backend, store, collectives, hang watchdog.

One home for everything `torch.distributed` needs before a multi-rank
strategy can start, and the few collectives the trainer and the checkpoint
manager use (`barrier`, `broadcast_object`, `all_reduce_sum`).

Launch modes, all ending in the same initialised default process group:
- `torchrun` (static or elastic, c10d rendezvous) and `srun` wrappers that
  export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT: used as given.
- A plain `vla-scale train` with a multi-rank strategy and none of those
  variables: a world of one (RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, a free
  local port). Without them DeepSpeed goes looking for MPI (mpi4py) and fails.

Backend: NCCL when CUDA is available (one device per local rank), gloo on
CPU. On CPU, `DS_ACCELERATOR=cpu` is set before DeepSpeed is imported, so it
never probes for a GPU stack.

Elastic restarts (torchrun --max-restarts): by default torchrun >= 2.4 lets
workers share one TCP store (hosted by the agent of node 0) across restarts
(`TORCHELASTIC_USE_AGENT_STORE=True`); restarted workers then read the
previous attempt's gloo addresses from it and about half of the restarts
hang or fail in `connectFullMesh` (PyTorch issues 135712, 167288; measured,
see MACHINE.md). Two routes, chosen by what torchrun tells the workers:
- One node (`GROUP_WORLD_SIZE=1`: a single agent): we connect to that store
  ourselves and wrap it in a per-attempt `PrefixStore("attempt_<TORCHELASTIC_RESTART_COUNT>")`,
  so each attempt sees only its own keys. One agent counts its own restarts,
  so every worker agrees on the prefix.
- Several nodes: `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` in every agent's
  environment is required (`vla-scale launch slurm` exports it). The agent
  of node 0 then picks a fresh MASTER_PORT for every rendezvous round and
  worker 0 hosts a new store there, so no attempt can see another's keys.
  A prefix cannot be agreed on here: each agent counts restarts separately
  (the agent whose worker failed counts one, the others restart without
  counting; a node joining restarts everyone without counting), and torch
  2.13 gives workers nothing else per round (the rendezvous round stays in
  the agents: the environment holds RANK, GROUP_RANK, ROLE_RANK, *WORLD_SIZE,
  MASTER_ADDR/PORT, TORCHELASTIC_RESTART_COUNT/MAX_RESTARTS/RUN_ID/USE_AGENT_STORE
  only). So a multi-node run on the shared store fails at start with a
  `ConfigError` naming the variable, rather than hanging at its first restart.

Hangs: a rank stuck in a collective whose peer died waits for the process
group timeout. `HangWatchdog` (faulthandler.dump_traceback_later) turns a
step that takes longer than `train.hang_timeout_s` into a traceback of every
thread and an exit, which the elastic agent treats as a failure. Unset, it
is on under SLURM (`SLURM_JOB_ID` in the environment) with
`SLURM_HANG_TIMEOUT_S` = 20 minutes and off elsewhere (`resolve_hang_timeout`).

This module must never pick a rank, a world size or a master address that
the launcher gave, never initialise the process group twice, and never
import DeepSpeed (strategies do; it only prepares the environment for it).
"""
from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Long enough for rank 0 to convert a 7B checkpoint to DeepSpeed's universal
# format while the others wait in a barrier; override for faster failure in tests.
DEFAULT_TIMEOUT_S = float(os.environ.get("VLA_SCALE_DIST_TIMEOUT_S", 1800))

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# The hang watchdog's timeout under SLURM when train.hang_timeout_s is unset: longer than a
# step plus a sharded 34B checkpoint save on a parallel filesystem or a validation pass (minutes),
# shorter than the 30-minute process-group timeout, so the traceback shows where a rank hung.
SLURM_HANG_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    restart_count: int  # torchrun's TORCHELASTIC_RESTART_COUNT (0 on the first attempt and without torchrun)
    backend: str
    device: torch.device


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def ensure_launch_env() -> bool:
    """Fill in a world of one when no launcher set RANK/WORLD_SIZE/...; True if it did.

    A partial set (e.g. RANK without MASTER_ADDR) is a launcher problem, not
    something to guess around, so it is reported rather than completed.
    """
    present = [v for v in _LAUNCH_VARS if v in os.environ]
    if len(present) == len(_LAUNCH_VARS):
        return False
    if present and set(present) != {"LOCAL_RANK"}:
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        from vla_scale.errors import ConfigError

        raise ConfigError(f"the launcher set {present} but not {missing}; launch with torchrun/srun "
                          "(which set all of them) or unset them to run as a single process")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return True


def prepare_deepspeed_env() -> None:
    """Environment DeepSpeed reads at import: the CPU accelerator when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def check_elastic_store(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a multi-node torchrun that shares its agent store with the workers (module docstring)."""
    nodes = int(environ.get("GROUP_WORLD_SIZE", 1))
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and nodes > 1:
        from vla_scale.errors import ConfigError

        raise ConfigError(f"torchrun runs {nodes} nodes on one shared TCP store, on which a restart (a failed "
                          "worker or a node joining) would make the nodes disagree about which attempt they are "
                          "in and hang; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment of torchrun "
                          "on every node (the sbatch script of `vla-scale launch slurm` does)")


def resolve_hang_timeout(configured: float | None, environ: Mapping[str, str] = os.environ) -> float:
    """train.hang_timeout_s, or when unset (None): SLURM_HANG_TIMEOUT_S under SLURM, 0 (off) elsewhere."""
    if configured is not None:
        return float(configured)
    return SLURM_HANG_TIMEOUT_S if environ.get("SLURM_JOB_ID") else 0.0


def init_distributed(timeout_s: float | None = None) -> DistEnv:
    """Initialise the default process group once (idempotent) and return this rank's place in it."""
    ensure_launch_env()
    check_elastic_store()
    prepare_deepspeed_env()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    env = DistEnv(rank, world_size, local_rank, local_world_size, restart, backend, device)
    if dist.is_initialized():
        return env
    timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world_size, "timeout": timeout}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # One node (check_elastic_store): its agent hosts the store at MASTER_ADDR:MASTER_PORT and
        # keeps it across restarts, which it alone counts: namespace this attempt's keys.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timeout)
        kwargs["store"] = dist.PrefixStore(f"attempt_{restart}", store)
    else:
        kwargs["init_method"] = "env://"
    if backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL communicator init: fail here, not in the first collective
    dist.init_process_group(**kwargs)
    log.info("process group: rank %d/%d (local %d), backend %s, attempt %d", rank, world_size, local_rank,
             backend, restart)
    return env


def shutdown() -> None:
    """Destroy the default process group, if there is one (at the end of a CLI command).

    No barrier: after a successful run every rank has passed the final
    checkpoint's barrier; after a failure a barrier could wait for a dead peer.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_multi_rank():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (any picklable object; small ones: it goes through the CPU)."""
    if not is_multi_rank():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it (a no-op in a world of one)."""
    if is_multi_rank():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class HangWatchdog:
    """Exit with every thread's traceback if no `arm()` comes within `timeout_s` seconds.

    Call `arm()` at the start of each unit of work (a training step, a
    checkpoint save); `cancel()` when done. A timeout of 0 disables it. The
    dump goes to stderr, which torchrun keeps per rank.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = float(timeout_s or 0)

    def arm(self) -> None:
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=sys.stderr, exit=True)

    def cancel(self) -> None:
        if self.timeout_s > 0:
            faulthandler.cancel_dump_traceback_later()
