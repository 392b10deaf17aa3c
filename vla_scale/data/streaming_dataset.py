"""`CoTrainingDataset`: streaming's StreamingDataset plus the provenance of each sample.

It adds three keys to every sample it returns: `_uid` (the global sample id),
`_stream` (which source it came from) and `_epoch`, so augmentation can be
deterministic per (seed, sample, epoch) in any worker. It changes nothing
else: order, partitioning, shuffling and resumption are streaming's own.
Defined at module level so that loader workers started with spawn can
unpickle it.
"""
from __future__ import annotations

from typing import Any

from vla_scale.data.streaming_compat import import_streaming

_streaming = import_streaming()


class CoTrainingDataset(_streaming.StreamingDataset):
    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = super().get_item(sample_id, retry)
        shard_id, _ = self.spanner[sample_id]
        sample["_uid"] = int(sample_id)
        sample["_stream"] = int(self.stream_per_shard[shard_id])
        sample["_epoch"] = max(int(self.next_epoch) - 1, 0)
        return sample
