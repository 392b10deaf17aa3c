"""Crash-safe checkpoint folders of a run, and the RNG state they carry.

This module decides WHERE and HOW a checkpoint is written, found and
verified; WHAT goes into it (engine shards, optimizer, scheduler, data-loader
state) is the strategy's business, passed in as a `write_fn(tmp_dir)`.

Layout of a run's `checkpoints/` folder (the manager's `root`):

    checkpoints/
      step_00000200/              one directory per saved step
        ...                       whatever write_fn wrote (every rank)
        rng_state_rank0.pt        see save_rng_state
        metadata.json             the caller's metadata + step, world_size, time
        COMPLETE                  written LAST: {"step", "time", "files": {relpath: bytes}}
      step_00000300/
      latest                      text: the name of the newest committed directory
      step_00000400.tmp-1a2b3c4d  a save in progress (or one killed mid-way)

Why it survives a crash at any point: a checkpoint is assembled in a
`*.tmp-*` directory that no reader looks at; `COMPLETE` is written (and every
file and the directory fsynced) before one `os.rename` gives the directory
its final name; `latest` is then replaced atomically (temp file + fsync +
`os.replace`); pruning renames a victim to a `*.tmp-*` name before deleting
it, so a half-deleted directory never carries a checkpoint name. Readers
trust a directory only if `COMPLETE` is present and every file it lists
exists with the listed size; if `latest` names anything else, `latest()`
warns and falls back to the newest complete directory by step number.
Stale `*.tmp-*` entries are removed by rank 0 at the next `begin`, never by
readers (a reader cannot tell a dead save from one in progress).

Saving the same step twice (a run resumed from an earlier checkpoint reaches
a step it had already saved) replaces the old directory: the new one is
fully written first, then swapped in (see `CheckpointManager._publish`).
Raising instead would kill a legitimately resumed run.

Several ranks (DeepSpeed ZeRO-3): every rank calls `begin`, `write_fn`,
`commit` in the same order. Rank 0 creates the temp directory and hands its
name to the others through `broadcast`; `barrier` separates the phases; only
rank 0 writes metadata, `COMPLETE` and `latest`, and renames. The root must
be on a filesystem all ranks share. Rank 0's fsync may not flush another
node's client cache: ranks > 0 should `fsync_tree` their own files at the
end of `write_fn` (`fsync_files`; never `fsync_tree`, which would walk
into files other ranks are still writing or renaming). DeepSpeed's
`engine.save_checkpoint(tmp_dir, tag=...)` writes its shards under
`tmp_dir/<tag>/` and its own `latest` file (naming the tag) into `tmp_dir`:
that `latest` is what DeepSpeed's `zero_to_fp32.py` reads, and it lives
inside the step directory, so it never collides with this manager's
`latest` one level up.

This module must never modify a committed checkpoint in place, never delete
anything but its own temp entries and checkpoints pruned by `keep_last_k`,
never clean up from a reader, and never load model weights.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vla_scale.errors import CheckpointError, ConfigError

CHECKPOINTS_DIR = "checkpoints"  # inside a run directory
COMPLETE = "COMPLETE"
METADATA = "metadata.json"
LATEST = "latest"
TMP_MARK = ".tmp-"
STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(name: str) -> int | None:
    m = STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- durable writes


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (some network mounts) refuse fsync on directories;
        # they also give no stronger primitive, so there is nothing to do.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every file and directory under `path` (the data, not only the names)."""
    path = Path(path)
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def fsync_files(paths: "list[str | os.PathLike[str]]") -> None:
    """fsync these files and their directories (a rank's own files of a multi-rank save).

    Unlike `fsync_tree`, this never walks into files another rank may be
    writing (or renaming) at the same moment.
    """
    dirs = set()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(Path(p).parent)
    for d in sorted(dirs):
        _fsync_dir(d)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old or the new content, never a mix.

    Temp file in the same directory (so `os.replace` is a rename within one
    filesystem), fsync of the file before the rename and of the directory
    after, so a power loss cannot leave an empty file under the final name.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """`write_bytes_atomic` of `obj` as JSON; NaN/inf are refused (they are not JSON)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def read_metadata(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The `metadata.json` of a checkpoint directory."""
    path = Path(ckpt_dir) / METADATA
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {ckpt_dir} is not a complete checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None


# --------------------------------------------------------------------------- the manager


def _no_barrier() -> None:
    pass


def _no_broadcast(value: str) -> str:
    return value


class CheckpointManager:
    """Saves, finds, verifies and prunes the step directories under `root`.

    `keep_last_k`: how many checkpoints to keep, newest by step number
    (None: keep all). The directory just written and the one `latest` names
    are never pruned.

    `barrier()` and `broadcast(name) -> name` (rank 0's value returned on
    every rank) are the collectives of the launching strategy; both are
    needed only when `world_size > 1`, e.g. with torch.distributed:
    `barrier=dist.barrier` and a `broadcast` built on
    `dist.broadcast_object_list`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last_k: int | None = 3,
        rank: int = 0,
        world_size: int = 1,
        *,
        barrier: Callable[[], None] | None = None,
        broadcast: Callable[[str], str] | None = None,
    ) -> None:
        if keep_last_k is not None and keep_last_k < 1:
            raise ConfigError(f"train.keep_last_k must be >= 1, got {keep_last_k}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 ({world_size})")
        if world_size > 1 and (barrier is None or broadcast is None):
            raise ValueError("CheckpointManager with world_size > 1 needs barrier and broadcast callables")
        self.root = Path(root)
        self.keep_last_k = keep_last_k
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier or _no_barrier
        self._broadcast = broadcast or _no_broadcast

    # ------------------------------------------------------------------ writing

    def save(self, step: int, write_fn: Callable[[Path], None], metadata: dict[str, Any] | None = None) -> Path:
        """`begin`, `write_fn(tmp_dir)`, `commit`: the whole save, on every rank.

        If `write_fn` raises (or the process dies), the temp directory is left
        behind for inspection and removed at the next save; the previous
        checkpoint and `latest` are untouched.
        """
        tmp_dir = self.begin(step)
        write_fn(tmp_dir)
        return self.commit(step, tmp_dir, metadata)

    def begin(self, step: int) -> Path:
        """Create (rank 0) and return the temp directory every rank writes step `step` into."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        name = ""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            name = f"{step_dir_name(step)}{TMP_MARK}{secrets.token_hex(4)}"
            (self.root / name).mkdir()
        name = self._broadcast(name)
        self._barrier()
        return self.root / name

    def commit(self, step: int, tmp_dir: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
        """Seal the temp directory as the checkpoint of `step`; returns its final path (every rank)."""
        tmp_dir = Path(tmp_dir)
        final = self.root / step_dir_name(step)
        self._barrier()  # every rank has finished writing into tmp_dir
        if self.rank == 0:
            if tmp_dir.parent != self.root or not tmp_dir.name.startswith(step_dir_name(step) + TMP_MARK):
                raise ValueError(f"{tmp_dir} is not a temp directory that begin({step}) returned")
            meta = dict(metadata or {})
            if meta.get("step", step) != step:
                raise ValueError(f"metadata step {meta['step']} differs from the saved step {step}")
            meta.update(step=step, world_size=self.world_size, time=time.time())
            write_json_atomic(tmp_dir / METADATA, meta)
            fsync_tree(tmp_dir)
            files = {
                p.relative_to(tmp_dir).as_posix(): p.stat().st_size
                for p in sorted(tmp_dir.rglob("*"))
                if p.is_file() and p.name != COMPLETE
            }
            write_json_atomic(tmp_dir / COMPLETE, {"step": step, "time": time.time(), "files": files})
            self._publish(tmp_dir, final)
            self._set_latest(final.name)
            self._prune(protect={final.name})
        self._barrier()  # nobody moves on (or exits) before the checkpoint is published
        return final

    def _publish(self, tmp_dir: Path, final: Path) -> None:
        if final.exists():
            # Same step saved again. While the old directory is moved aside,
            # `latest` must not name it: point it at another complete
            # checkpoint first (if there is one), then swap, then delete.
            if self._read_latest() == final.name:
                others = [p for p in self.list_complete() if p.name != final.name]
                older = [p for p in others if _step_of(p.name) < _step_of(final.name)]  # type: ignore[operator]
                if older or others:
                    self._set_latest((older or others)[-1].name)
            aside = self.root / f"{final.name}{TMP_MARK}{secrets.token_hex(4)}-replaced"
            os.rename(final, aside)
            os.rename(tmp_dir, final)
            _fsync_dir(self.root)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp_dir, final)
            _fsync_dir(self.root)

    def _set_latest(self, name: str) -> None:
        write_bytes_atomic(self.root / LATEST, (name + "\n").encode("utf-8"))

    def _read_latest(self) -> str | None:
        try:
            return (self.root / LATEST).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None

    def _prune(self, protect: set[str]) -> None:
        if self.keep_last_k is None:
            return
        complete = self.list_complete()
        keep = set(protect) | {p.name for p in complete[-self.keep_last_k :]}
        latest = self._read_latest()
        if latest:
            keep.add(latest)
        for path in complete:
            if path.name in keep:
                continue
            # Rename first: a crash during rmtree must not leave a
            # half-deleted directory under a checkpoint name.
            aside = self.root / f"{path.name}{TMP_MARK}{secrets.token_hex(4)}-pruned"
            os.rename(path, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def _remove_stale(self) -> None:
        for entry in os.scandir(self.root):
            if TMP_MARK not in entry.name:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    # ------------------------------------------------------------------ reading

    def list_complete(self) -> list[Path]:
        """Complete, undamaged checkpoint directories, oldest step first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in os.scandir(self.root):
            step = _step_of(entry.name)
            if step is not None and entry.is_dir() and _problem(Path(entry.path)) is None:
                found.append((step, Path(entry.path)))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint to resume from: what `latest` names if complete, else the newest complete one."""
        name = self._read_latest()
        if name is not None:
            if _step_of(name) is None:
                problem = f"{self.root / LATEST} holds {name!r}, which is not a checkpoint directory name"
            else:
                problem = _problem(self.root / name)
                if problem is None:
                    return self.root / name
                problem = f"checkpoint {self.root / name}, named by {self.root / LATEST}, is not usable: {problem}"
            complete = self.list_complete()
            fallback = f"falling back to {complete[-1]}" if complete else "no complete checkpoint remains"
            warnings.warn(f"{problem}; {fallback}", stacklevel=2)
            return complete[-1] if complete else None
        # No `latest` yet (e.g. killed between the first rename and writing it).
        complete = self.list_complete()
        return complete[-1] if complete else None

    def verify(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Check a checkpoint directory against its COMPLETE listing; returns the listing.

        Raises CheckpointError naming the missing or damaged file.
        """
        path = Path(path)
        problem = _problem(path)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {path} is incomplete or damaged: {problem}. "
                "Resume from another checkpoint (--resume <run>/checkpoints/step_XXXXXXXX) or delete this one."
            )
        return json.loads((path / COMPLETE).read_text(encoding="utf-8"))

    def resolve(self, spec: str | os.PathLike[str] | None, what: str = "--resume") -> Path | None:
        """The checkpoint a `--resume` value (or another command's argument, named by `what`) means.

        "auto": `latest()` (None if there is none, i.e. a fresh start);
        "none", "" or None: None; a checkpoint directory: itself, verified;
        a checkpoints folder or a run directory: its latest complete
        checkpoint. A path that is missing, damaged or holds no complete
        checkpoint raises CheckpointError.
        """
        if spec is None:
            return None
        text = str(spec).strip()
        if text.lower() in ("", "none"):
            return None
        if text.lower() == "auto":
            return self.latest()
        path = Path(text).expanduser()
        what_to_pass = "pass a checkpoint directory (<run>/checkpoints/step_XXXXXXXX) or a run directory" + (
            ", 'auto' or 'none'" if what == "--resume" else "")
        if not path.is_dir():
            state = "is a file" if path.exists() else "does not exist"
            raise CheckpointError(f"{what} {text}: {path} {state}; {what_to_pass}")
        if _step_of(path.name) is not None or (path / COMPLETE).exists():
            self.verify(path)
            return path
        for root in (path, path / CHECKPOINTS_DIR):
            if (root / LATEST).exists() or any(_step_of(p.name) is not None for p in _listdir(root)):
                found = CheckpointManager(root, keep_last_k=None).latest()
                if found is None:
                    raise CheckpointError(f"{what} {text}: {root} holds no complete checkpoint; {what_to_pass}")
                return found
        raise CheckpointError(f"{what} {text}: {path} contains no checkpoints; {what_to_pass}")


def _listdir(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def _problem(path: Path) -> str | None:
    """What makes `path` not a complete checkpoint, or None if it is one."""
    if not path.is_dir():
        return f"{path} does not exist"
    marker = path / COMPLETE
    try:
        listing = json.loads(marker.read_text(encoding="utf-8"))
        files = listing["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return f"{marker} is missing (the save did not finish)"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return f"{marker} is damaged (not the JSON listing the save writes)"
    for rel, size in files.items():
        file = path / rel
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            return f"{file} is missing"
        if actual != size:
            return f"{file} has {actual} bytes, COMPLETE lists {size}"
    return None


# --------------------------------------------------------------------------- RNG state
#
# Stored in structures `torch.load(weights_only=True)` accepts (tensors, ints,
# floats, None, tuples, lists, dicts): numpy's key array is kept as a torch
# tensor. So loading never unpickles arbitrary objects, even from a
# checkpoint folder someone else wrote.


def capture_rng_state() -> dict[str, Any]:
    """Python `random`, numpy's global generator, torch CPU and every CUDA device."""
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda) != count:
            warnings.warn(
                f"the RNG state has {len(cuda)} CUDA devices, this process sees {count}; "
                f"restoring the first {min(len(cuda), count)}",
                stacklevel=2,
            )
        for i, s in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(s, i)


def rng_state_file(ckpt_dir: str | os.PathLike[str], rank: int) -> Path:
    return Path(ckpt_dir) / f"rng_state_rank{rank}.pt"


def save_rng_state(ckpt_dir: str | os.PathLike[str], rank: int) -> Path:
    """Write this process's RNG state to `<ckpt_dir>/rng_state_rank{rank}.pt`."""
    path = rng_state_file(ckpt_dir, rank)
    torch.save(capture_rng_state(), path)
    return path


def load_rng_state(ckpt_dir: str | os.PathLike[str], rank: int, *, restore: bool = True) -> dict[str, Any]:
    """Read (and by default restore) the RNG state saved by `rank`.

    A rank with no file of its own (the world size grew) takes rank 0's,
    with a warning: its random streams then repeat rank 0's.
    """
    path = rng_state_file(ckpt_dir, rank)
    if not path.exists() and rank != 0:
        fallback = rng_state_file(ckpt_dir, 0)
        warnings.warn(
            f"{path} is missing (was the checkpoint saved with fewer ranks?); using {fallback.name}", stacklevel=2
        )
        path = fallback
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint {ckpt_dir} has no RNG state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged") from None
    if restore:
        restore_rng_state(state)
    return state
