"""Action chunks (T, D) built at read time from per-step robot shards.

Converters write one action per step, episodes contiguously and in step
order (`ShardWriter` counts episodes by contiguity). With `actions.chunk = T`
the target of the sample at global id i is the actions of ids i, i+1, ...,
i+T-1 of the same stream, as long as they continue the same episode; past
the episode's end the last action is repeated and the pad mask says which
steps are real. Padded steps are left out of the loss
(`PromptBuilder.build_robot(valid_steps=...)`).

Why by sample id, rather than storing each step's future actions at
conversion time: the chunk is then a pure function of the sample id and the
shards, so shuffling, mid-epoch resume and world-size changes (which only
change WHICH ids a rank reads, never what an id holds) keep their exactness
with no extra state; any T works on already-converted data, and the shards
stay one action per step. The cost is T-1 extra reads per sample; only the
action/episode/step/task columns of those rows are decoded (never their
images), straight from streaming's shard readers, and a neighbour's shard is
downloaded through streaming's own `prepare_shard` when it is not local.

Continuity is checked, not assumed: a following row of the same episode must
have the next step index, and a row of another episode must start it at step
0; anything else means the shards were not written in episode order, which
is a DataError naming the sample (padding it would train on wrong targets).
Stored actions that already are (T, D) chunks (the synthetic set) are used
as they are, with no padding. This module never writes shards.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vla_scale.data.schema import ROBOT_TASK
from vla_scale.data.streaming_compat import import_streaming
from vla_scale.data.streaming_dataset import CoTrainingDataset
from vla_scale.errors import DataError

CHUNK_KEY = "_action_chunk"  # (T, D) float32, added to robot samples by ChunkedCoTrainingDataset
VALID_KEY = "_chunk_valid"  # (T,) bool: False at steps padded past the episode's end
_NEIGHBOUR_COLUMNS = ("task", "action", "episode", "step")
_RETRIES = 7  # as streaming's get_item: a shard evicted between prepare and read is fetched again


def decode_columns(shard: Any, data: bytes, wanted: tuple[str, ...]) -> dict[str, Any]:
    """Only the `wanted` columns of one raw MDS sample (streaming's layout: the sizes of the
    variable-size columns as uint32, then every column's bytes in column order)."""
    import_streaming()
    from streaming.base.format.mds.encodings import mds_decode

    sizes, at = [], 0
    for size in shard.column_sizes:
        if size:
            sizes.append(size)
        else:
            sizes.append(int(np.frombuffer(data[at:at + 4], np.uint32)[0]))
            at += 4
    out = {}
    for name, encoding, size in zip(shard.column_names, shard.column_encodings, sizes):
        if name in wanted:
            out[name] = mds_decode(encoding, data[at:at + size])
        at += size
    return out


def pad_chunk(actions: list[np.ndarray], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps read so far -> (chunk, D) by repeating the last one, and the (chunk,) valid mask."""
    valid = np.zeros(chunk, dtype=bool)
    valid[:len(actions)] = True
    rows = list(actions) + [actions[-1]] * (chunk - len(actions))
    return np.stack(rows).astype(np.float32), valid


class ChunkedCoTrainingDataset(CoTrainingDataset):
    """`CoTrainingDataset` whose robot samples carry the (T, D) chunk starting at them (see the module doc)."""

    def __init__(self, *args: Any, chunk: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if chunk < 2:
            raise ValueError(f"ChunkedCoTrainingDataset needs chunk >= 2, got {chunk}")
        self.chunk = int(chunk)

    def _neighbour(self, sample_id: int) -> dict[str, Any]:
        shard_id, index = self.spanner[sample_id]
        shard = self.shards[shard_id]
        if shard_id not in self._verified:  # the same hash check get_item makes on a shard's first use
            self._verify_local(shard_id)
        for _ in range(1 + _RETRIES):
            try:
                data = shard.get_sample_data(index)
                break
            except FileNotFoundError:  # not local (remote stream, evicted): streaming downloads (and checks) it
                self.prepare_shard(shard_id)
        else:
            raise DataError(f"{self._shard_name(shard_id)}, sample {index}: the shard could not be made local to "
                            f"read an action chunk")
        try:
            return decode_columns(shard, data, _NEIGHBOUR_COLUMNS)
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise DataError(f"{self._shard_name(shard_id)}, sample {index}: cannot read the sample ({type(e).__name__}: "
                            f"{e}); the shard is damaged (re-convert or re-upload it)") from None

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = super().get_item(sample_id, retry)
        if sample.get("task") != ROBOT_TASK:
            return sample
        first = np.asarray(sample["action"], dtype=np.float32)
        if first.ndim == 2:  # stored as a chunk already: used as it is
            sample[CHUNK_KEY], sample[VALID_KEY] = first, np.ones(first.shape[0], dtype=bool)
            return sample
        stream = int(sample["_stream"])
        end = int(self.sample_offset_per_stream[stream]) + int(self.samples_per_stream[stream])
        episode, step = int(sample["episode"]), int(sample["step"])
        steps = [first]
        for k in range(1, self.chunk):
            j = int(sample_id) + k
            if j >= end:
                break
            nxt = self._neighbour(j)
            if nxt.get("task") != ROBOT_TASK or int(nxt["episode"]) != episode:
                if int(nxt.get("step", 0)) not in (0, -1):
                    raise DataError(
                        f"sample {sample_id} (episode {episode}, step {step}): the next row, sample {j}, is step "
                        f"{int(nxt['step'])} of episode {int(nxt['episode'])}; action chunks need episodes stored "
                        f"contiguously in step order, as `vla-scale convert` writes them")
                break
            if int(nxt["step"]) != step + k:
                raise DataError(
                    f"sample {sample_id} (episode {episode}, step {step}): sample {j} is step {int(nxt['step'])} of "
                    f"the same episode, expected step {step + k}; action chunks need episodes stored in step order")
            action = np.asarray(nxt["action"], dtype=np.float32)
            if action.shape != first.shape:
                raise DataError(f"sample {j} (episode {episode}, step {step + k}): action has shape {action.shape}, "
                                f"step {step} has {first.shape}")
            steps.append(action)
        sample[CHUNK_KEY], sample[VALID_KEY] = pad_chunk(steps, self.chunk)
        return sample
