"""`CoTrainingDataset`: streaming's StreamingDataset plus the provenance of each sample, and the
`rank_mixed` batching method that gives every rank (and micro-batch) a mixed slice.

The dataset adds three keys to every sample it returns: `_uid` (the global sample id),
`_stream` (which source it came from) and `_epoch`, so augmentation can be
deterministic per (seed, sample, epoch) in any worker.

Batching. streaming's `stratified` method makes every GLOBAL batch hold the exact
per-source counts, but lays each global batch out source by source and gives each
rank a contiguous slice of it: on 8 ranks with the paper's mix, ranks 0-3 would see
only robot data. `rank_mixed` is `stratified` followed by one fixed permutation of
the positions inside each global batch (`vla_scale.data.mixture.mixing_permutation`),
so that every rank's slice, and every micro-batch of it, holds each source in
proportion. Which samples form a global batch, and the order of global batches, are
untouched: they stay streaming's (independent of the world size for a fixed global
batch and `num_canonical_nodes`), and so do mid-epoch resumption and world-size
changes. The method is registered in streaming's own table of batching methods at
import; this module is what loader workers unpickle, so they register it too.

Integrity. Every shard is checked against the hash in its index before its first sample is
read (`validate_hash`, e.g. xxh64): shards of remote sources by streaming itself when they are
downloaded (a failed check becomes a DataError naming the shard and the remote, and the bad
download is deleted from the cache so a later run fetches it again), shards of local folders by
this class the first time each process opens them (streaming checks only what it downloads).
With a cache limit, only shards cached from a remote are ever evicted: streaming's own eviction
would delete the files of a local source folder.

Eviction race. streaming's ready thread (one per loader worker) asks for a shard only if it is
REMOTE when it reaches it, then waits for it to turn LOCAL. Under a cache limit the shard it waits
for can be downloaded (by another worker) and evicted again (by any worker making room) between two
of its polls: it then waits for good, and so does training (seen in CI: a hang in
`test_a_cache_limit_evicts_downloaded_shards_only`). `_ready_thread` here asks again whenever the
shard it waits for is back to REMOTE (`_wait_until_local`).

This module must not change which samples streaming picks, only where they sit in a batch.
Defined at module level so that loader workers started with spawn can unpickle it.
"""
from __future__ import annotations

import logging
import os
from time import sleep
from typing import Any, Iterator

import numpy as np

from vla_scale.data.mixture import mixing_permutation
from vla_scale.data.storage import check_shard_bytes, join
from vla_scale.data.streaming_compat import import_streaming
from vla_scale.errors import DataError

_streaming = import_streaming()
log = logging.getLogger(__name__)

RANK_MIXED = "rank_mixed"


def generate_work_rank_mixed(dataset: Any, world: Any, epoch: int, sample_in_epoch: int) -> np.ndarray:
    """streaming's stratified work, with each global batch permuted so that rank slices are mixed.

    Returns streaming's layout: (physical nodes, ranks per node, workers per rank, batches per
    worker, per-rank batch).
    """
    from streaming.base.batching.stratified import generate_work_stratified_batching

    work = generate_work_stratified_batching(dataset, world, epoch, sample_in_epoch)
    nodes, ranks_per_node, workers, _, rank_batch = work.shape
    ranks = nodes * ranks_per_node
    # Undo streaming's final reshape: rows are global batches in training order, ranks' slices contiguous.
    rows = work.transpose(3, 2, 0, 1, 4).reshape(-1, ranks * rank_batch)
    full = rows.min(axis=1) >= 0  # streaming pads the epoch's tail with whole batches of -1
    if not full.any():
        return work
    micro = int(getattr(dataset, "micro_batch_size", rank_batch) or rank_batch)
    if rank_batch % micro:
        micro = rank_batch
    offsets = np.asarray(dataset.sample_offset_per_stream)
    streams = np.searchsorted(offsets, rows[full], side="right") - 1
    if (streams != streams[0]).any():
        # stratified lays out every global batch the same way (source portions in stream order);
        # one permutation then serves them all. Anything else means streaming changed underneath us.
        raise DataError("mosaicml-streaming's stratified batches differ in layout from batch to batch, which "
                        "rank_mixed batching does not expect; use the tested streaming version (0.13)")
    perm = mixing_permutation(streams[0], ranks, rank_batch // micro)
    rows[full] = rows[full][:, perm]
    return rows.reshape(-1, workers, nodes, ranks_per_node, rank_batch).transpose(2, 3, 1, 0, 4)


def _register() -> None:
    from streaming.base import batching

    batching.batching_methods.setdefault(RANK_MIXED, generate_work_rank_mixed)


_register()


class CoTrainingDataset(_streaming.StreamingDataset):
    """StreamingDataset with provenance keys; `batching_method="rank_mixed"` mixes every rank's slice;
    shards checked against their hashes (`validate_hash`, see the module docstring)."""

    def __init__(self, *args: Any, batching_method: str = RANK_MIXED, micro_batch_size: int | None = None,
                 validate_hash: str | None = None, **kwargs: Any):
        # streaming's constructor accepts only its built-in method names, though it dispatches through
        # the registry we added ours to: construct as stratified, then switch.
        mixed = batching_method == RANK_MIXED
        super().__init__(*args, batching_method="stratified" if mixed else batching_method, **kwargs)
        if mixed:
            self.batching_method = RANK_MIXED
        self.micro_batch_size = micro_batch_size
        self.validate_hash = validate_hash
        self._verified: set[int] = set()  # per process: shards of local sources checked so far
        self._integrity_error: Exception | None = None
        if self.cache_limit:
            # streaming counts local sources' files as cache usage; never evicted (see _evict_coldest_shard),
            # they must not eat into the limit meant for downloaded shards.
            self.cache_limit += sum(self._local_bytes(i) for i in range(self.num_shards))
        unchecked = sorted({s.local for s in self.streams if validate_hash and validate_hash not in
                            _stream_hashes(self, s)})
        for folder in unchecked:
            log.warning("shards in %s carry no %s hash (written before shards had hashes): they are read unchecked; "
                        "re-convert them to get integrity checks", folder, validate_hash)

    def _stream_of(self, shard_id: int) -> Any:
        return self.streams[int(self.stream_per_shard[shard_id])]

    def _local_bytes(self, shard_id: int) -> int:
        stream = self._stream_of(shard_id)
        if stream.remote:
            return 0
        total = 0
        for raw, zipped in self.shards[shard_id].file_pairs:
            for info in (raw, zipped):
                if info is not None:
                    path = os.path.join(stream.local, stream.split or "", info.basename)
                    total += os.path.getsize(path) if os.path.isfile(path) else 0
        return total

    def _evict_coldest_shard(self) -> None:
        states = self._shard_states.numpy()
        times = self._shard_access_times.numpy()
        from streaming.base.dataset import _ShardState

        ids = [i for i in np.flatnonzero(states == _ShardState.LOCAL) if self._stream_of(int(i)).remote]
        if not ids:
            raise DataError(f"data.storage.cache_limit={self.cache_limit} bytes is too small: no downloaded shard "
                            "is left to evict; raise it (at least 4x the largest shard)")
        self._evict_shard(int(ids[int(np.argmin(times[ids]))]))

    def _ready_thread(self, it: Any) -> None:
        """streaming's ready thread (same protocol on `it`: stop when it should exit, at the end of
        the epoch or when another thread failed; stay at most `predownload` samples ahead of the yield
        loop), except that the wait for a shard survives its eviction (see the module docstring)."""
        from streaming.base.constant import TICK

        while not it.should_exit() and it.ready_index < it.total and not self._event.is_set():
            if self.predownload is not None and it.ready_index - it.yield_index > self.predownload:
                sleep(TICK)
                continue
            sample_id = int(it.sample_ids[it.ready_index])
            if sample_id != -1:
                self._wait_until_local(int(self.spanner[sample_id][0]), TICK)
            it.ready_index += 1
        it.on_exit()

    def _wait_until_local(self, shard_id: int, tick: float) -> None:
        """Return once the shard is LOCAL (or another thread failed), downloading it here each time it
        is found REMOTE: at the start, or again after someone evicted it before this thread saw it LOCAL.
        A shard being downloaded by another worker (PREPARING) is waited for, not fetched twice."""
        from streaming.base.dataset import _ShardState

        while not self._event.is_set():
            state = self._shard_states[shard_id]
            if state == _ShardState.LOCAL:
                return
            if state == _ShardState.REMOTE:
                self.prepare_shard(shard_id, False)
            else:
                sleep(tick)

    def _shard_name(self, shard_id: int) -> str:
        stream = self._stream_of(shard_id)
        raw, _ = self.shards[shard_id].file_pairs[0]
        return join(stream.remote, raw.basename) if stream.remote else os.path.join(stream.local, raw.basename)

    def _verify_local(self, shard_id: int) -> None:
        """Check a local source's raw shard file against its index before first use in this process."""
        self._verified.add(shard_id)
        stream = self._stream_of(shard_id)
        if stream.remote or not self.validate_hash:
            return
        for raw, _ in self.shards[shard_id].file_pairs:
            path = os.path.join(stream.local, stream.split or "", raw.basename)
            if not os.path.isfile(path) or self.validate_hash not in (raw.hashes or {}):
                continue  # compressed only: streaming checks the zip when it decompresses (validate_hash)
            with open(path, "rb") as f:
                data = f.read()
            check_shard_bytes(data, {"bytes": raw.bytes, "hashes": raw.hashes}, path, self.validate_hash)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except ValueError as e:
            if "Checksum failure" not in str(e) and "hash" not in str(e).lower():
                raise
            stream = self._stream_of(shard_id)
            if stream.remote:  # never leave a download that failed its check in the cache
                for raw, zipped in self.shards[shard_id].file_pairs:
                    for info in (raw, zipped):
                        if info is not None:
                            path = os.path.join(stream.local, stream.split or "", info.basename)
                            if os.path.isfile(path):
                                os.remove(path)
            err = DataError(f"{self._shard_name(shard_id)}: the shard does not match the {stream.validate_hash} hash "
                            f"in its index.json (a corrupt or replaced file; streaming said: {e}); re-convert or "
                            f"re-upload the dataset")
            self._integrity_error = self._integrity_error or err
            raise err from None

    def _raise_integrity_error(self) -> None:
        if self._integrity_error is not None:
            raise self._integrity_error

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._raise_integrity_error()
        yield from super().__iter__()
        # A failed download ends streaming's epoch early and silently (its thread only sets a flag).
        self._raise_integrity_error()

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        self._raise_integrity_error()
        shard_id, index = self.spanner[sample_id]
        if shard_id not in self._verified:
            self._verify_local(shard_id)
        try:
            sample = super().get_item(sample_id, retry)
        except RuntimeError:
            self._raise_integrity_error()
            raise
        except (TypeError, ValueError, IndexError, KeyError, OSError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{self._shard_name(shard_id)}, sample {index}: cannot read the sample "
                            f"({type(e).__name__}: {e}); the shard is damaged (re-convert or re-upload it)") from None
        sample["_uid"] = int(sample_id)
        sample["_stream"] = int(self.stream_per_shard[shard_id])
        sample["_epoch"] = max(int(self.next_epoch) - 1, 0)
        return sample


def _stream_hashes(dataset: Any, stream: Any) -> set[str]:
    ids = [i for i in range(dataset.num_shards) if dataset.streams[int(dataset.stream_per_shard[i])] is stream]
    common: set[str] | None = None
    for i in ids:
        algos = set(dataset.shards[i].file_pairs[0][0].hashes or {})
        common = algos if common is None else common & algos
    return common or set()
