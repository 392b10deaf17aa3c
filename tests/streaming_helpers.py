"""Test helpers: read shards back with a plain `streaming.StreamingDataset` and nothing of ours.

Each test gets its own temp dir for streaming's lock files and a unique
`local` per dataset (MACHINE.md: lock files pile up; `Reused local directory`).
Shared memory segments (/dev/shm/NNNNNN_*) are unlinked by streaming at process exit.
"""
from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest

from vla_scale.data.streaming_compat import import_streaming


@pytest.fixture
def read_plain(tmp_path, monkeypatch):
    """read_plain(folder) -> list of samples, in order, via streaming.StreamingDataset(local=folder)."""
    streaming = import_streaming()
    locks = tmp_path / "streaming-tmp"
    locks.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(locks))  # streaming puts its file locks in gettempdir()
    monkeypatch.setenv("TMPDIR", str(locks))

    def read(folder: Path) -> list[dict]:
        ds = streaming.StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
        try:
            return [ds[i] for i in range(len(ds))]
        finally:
            del ds
            gc.collect()

    yield read
    # Not streaming.base.util.clean_stale_shared_memory(): it unlinks every streaming segment from
    # prefix 0 up, including those of live datasets in other processes (a concurrent test run, a
    # training job). streaming unlinks our own segments when this process exits (test_shards checks).
    gc.collect()
