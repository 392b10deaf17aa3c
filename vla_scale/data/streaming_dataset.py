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

This module must not change which samples streaming picks, only where they sit in a batch.
Defined at module level so that loader workers started with spawn can unpickle it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vla_scale.data.mixture import mixing_permutation
from vla_scale.data.streaming_compat import import_streaming
from vla_scale.errors import DataError

_streaming = import_streaming()

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
    """StreamingDataset with provenance keys; `batching_method="rank_mixed"` mixes every rank's slice."""

    def __init__(self, *args: Any, batching_method: str = RANK_MIXED, micro_batch_size: int | None = None,
                 **kwargs: Any):
        # streaming's constructor accepts only its built-in method names, though it dispatches through
        # the registry we added ours to: construct as stratified, then switch.
        mixed = batching_method == RANK_MIXED
        super().__init__(*args, batching_method="stratified" if mixed else batching_method, **kwargs)
        if mixed:
            self.batching_method = RANK_MIXED
        self.micro_batch_size = micro_batch_size

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = super().get_item(sample_id, retry)
        shard_id, _ = self.spanner[sample_id]
        sample["_uid"] = int(sample_id)
        sample["_stream"] = int(self.stream_per_shard[shard_id])
        sample["_epoch"] = max(int(self.next_epoch) - 1, 0)
        return sample
