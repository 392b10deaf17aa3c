"""Checkpoint folders survive crashes, prune as configured, and resume where asked."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_scale.errors import CheckpointError
from vla_scale.train.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_rng_state,
    read_metadata,
    restore_rng_state,
    save_rng_state,
    write_json_atomic,
)


def _writer(payload: bytes):
    def write(tmp_dir: Path) -> None:
        (tmp_dir / "model.bin").write_bytes(payload)
        (tmp_dir / "sub").mkdir()
        (tmp_dir / "sub" / "optim.bin").write_bytes(payload * 2)

    return write


def _step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_keeps_last_k_and_latest_names_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep_last_k=2)
    for step in range(1, 6):
        final = manager.save(step * 10, _writer(bytes([step]) * 100), {"loss": 1.0 / step})
        assert final == root / f"step_{step * 10:08d}"
    assert _step_dirs(root) == ["step_00000040", "step_00000050"]
    assert (root / "latest").read_text().strip() == "step_00000050"
    assert manager.latest() == root / "step_00000050"
    assert manager.list_complete() == [root / "step_00000040", root / "step_00000050"]
    listing = manager.verify(root / "step_00000050")
    assert listing["files"]["model.bin"] == 100 and listing["files"]["sub/optim.bin"] == 200
    meta = read_metadata(root / "step_00000050")
    assert meta["step"] == 50 and meta["loss"] == pytest.approx(0.2) and meta["world_size"] == 1
    assert (root / "step_00000050" / "model.bin").read_bytes() == bytes([5]) * 100


def test_write_fn_error_keeps_previous_checkpoint_and_next_save_cleans_up(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last_k=3)
    manager.save(1, _writer(b"a" * 10), {})

    def failing(tmp_dir: Path) -> None:
        (tmp_dir / "model.bin").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        manager.save(2, failing, {})
    assert manager.latest() == tmp_path / "step_00000001"
    manager.verify(manager.latest())
    assert any(".tmp-" in name for name in _step_dirs(tmp_path))

    manager.save(3, _writer(b"c"), {})
    assert _step_dirs(tmp_path) == ["step_00000001", "step_00000003"]
    assert manager.latest() == tmp_path / "step_00000003"


# A child process saves step 1, then is killed (os._exit: no cleanup, no
# finally blocks) at one point of saving step 2.
_CHILD = textwrap.dedent(
    """
    import os, shutil, sys
    from pathlib import Path
    from vla_scale.train.checkpoint import CheckpointManager

    root, point = Path(sys.argv[1]), sys.argv[2]
    manager = CheckpointManager(root, keep_last_k=int(sys.argv[3]))
    manager.save(1, lambda d: (d / "model.bin").write_bytes(b"1" * 4096), {"step": 1})

    def die(*args, **kwargs):
        os._exit(17)

    def write(d):
        with open(d / "model.bin", "wb") as f:
            f.write(b"2" * 1000)
            f.flush()
            if point == "write":
                die()
        (d / "extra.bin").write_bytes(b"x")

    if point == "latest":  # directory renamed into place, `latest` not yet updated
        CheckpointManager._set_latest = die
    if point == "prune":  # old checkpoint moved aside, not yet deleted
        shutil.rmtree = die
    manager.save(2, write, {})
    os._exit(0)
    """
)


@pytest.mark.parametrize(
    ("point", "keep", "expected_latest"),
    [("write", 3, "step_00000001"), ("latest", 3, "step_00000001"), ("prune", 1, "step_00000002")],
)
def test_killed_process_leaves_a_loadable_latest(tmp_path: Path, point: str, keep: int, expected_latest: str) -> None:
    root = tmp_path / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), point, str(keep)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 17, proc.stderr

    manager = CheckpointManager(root, keep_last_k=3)
    latest = manager.latest()
    assert latest == root / expected_latest
    manager.verify(latest)
    if expected_latest == "step_00000001":
        assert (latest / "model.bin").read_bytes() == b"1" * 4096
    if point != "latest":
        assert any(".tmp-" in name for name in _step_dirs(root))  # the dead save's leftovers

    manager.save(3, _writer(b"3"), {})
    assert not any(".tmp-" in name for name in _step_dirs(root))
    assert manager.latest() == root / "step_00000003"


@pytest.mark.parametrize("damage", ["truncate", "delete", "delete_complete"])
def test_damaged_checkpoint_falls_back_and_is_named(tmp_path: Path, damage: str) -> None:
    manager = CheckpointManager(tmp_path, keep_last_k=3)
    manager.save(1, _writer(b"1" * 64), {})
    newest = manager.save(2, _writer(b"2" * 64), {})
    victim = {"truncate": "model.bin", "delete": "sub/optim.bin", "delete_complete": "COMPLETE"}[damage]
    if damage == "truncate":
        (newest / victim).write_bytes(b"2" * 10)
    else:
        (newest / victim).unlink()

    with pytest.warns(UserWarning, match="step_00000002") as record:
        assert manager.latest() == tmp_path / "step_00000001"
    assert victim.split("/")[-1] in str(record[0].message)
    assert manager.list_complete() == [tmp_path / "step_00000001"]
    with pytest.raises(CheckpointError, match=victim.split("/")[-1]):
        manager.verify(newest)
    with pytest.raises(CheckpointError, match=victim.split("/")[-1]):
        manager.resolve(str(newest))


def test_resolve(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    manager = CheckpointManager(root)
    assert manager.resolve("auto") is None  # nothing saved yet: a fresh start
    assert manager.resolve("none") is None
    assert manager.resolve("") is None
    with pytest.raises(CheckpointError, match="does not exist"):
        manager.resolve(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="contains no checkpoints"):
        manager.resolve(str(tmp_path))

    first = manager.save(5, _writer(b"5"), {})
    second = manager.save(6, _writer(b"6"), {})
    assert manager.resolve("auto") == second
    assert manager.resolve(str(first)) == first
    assert manager.resolve(str(run_dir)) == second
    assert manager.resolve(str(root)) == second


def test_same_step_saved_again_replaces_it(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last_k=3)
    manager.save(1, _writer(b"old"), {})
    manager.save(2, _writer(b"old"), {})
    again = manager.save(2, _writer(b"new!"), {})
    assert (again / "model.bin").read_bytes() == b"new!"
    assert manager.latest() == again
    assert _step_dirs(tmp_path) == ["step_00000001", "step_00000002"]


def test_never_prunes_the_checkpoint_just_written(tmp_path: Path) -> None:
    # Resumed from an earlier checkpoint: the new save has a lower step than
    # an abandoned one, and must survive keep_last_k=1.
    manager = CheckpointManager(tmp_path, keep_last_k=1)
    manager.save(20, _writer(b"a"), {})
    resumed = manager.save(15, _writer(b"b"), {})
    assert _step_dirs(tmp_path) == ["step_00000015", "step_00000020"]
    assert manager.latest() == resumed


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _draw() -> tuple:
    return (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist())


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = _draw()
    restore_rng_state(state)
    assert _draw() == expected

    restore_rng_state(state)
    save_rng_state(tmp_path, rank=0)
    _draw()
    load_rng_state(tmp_path, rank=0)  # torch.load(weights_only=True) inside
    assert _draw() == expected

    with pytest.warns(UserWarning, match="rng_state_rank3.pt"):
        load_rng_state(tmp_path, rank=3)  # world size grew: rank 0's state
    assert _draw() == expected

    with pytest.raises(CheckpointError, match="rng_state_rank0.pt"):
        load_rng_state(tmp_path / "empty", rank=0)
