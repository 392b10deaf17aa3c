"""The robot's proprioceptive state on its way to the model: statistics, normalisation, text.

State is normalised per dimension with its 1st/99th percentiles to [-1, 1] and clipped, as actions are
(`vla_scale.actions.normalizer`), with the same one-pass quantile sketch (`ActionStatistics`); a
dimension with q01 == q99 (constant) maps to 0. It reaches the model one of two ways
(`data.state`):
- "text": pi0.5-style, each normalised value discretised into `data.state_bins` equal bins of
  [-1, 1] and written as integers after the robot prompt ("... take to open the drawer? State: 12 200 45.");
- "projection": the normalised vector itself, for a trainable linear map to one prefix token
  (`VLACore.state_projection`).

Statistics: the `state` entry of a source's stats (`stats.json` or `sources.N.stats`) when present,
else computed once from the shards' `state` column into the run folder, like action statistics.
This module never writes into a dataset's folder.
"""
from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vla_scale.data.schema import ROBOT_TASK, optional_array
from vla_scale.errors import DataError

STATE_KEY = "state"  # the sub-dictionary of a source's statistics holding the state's q01/q99


class StateNormalizer:
    def __init__(self, q01: Any, q99: Any):
        self.q01 = np.asarray(q01, dtype=np.float64)
        self.q99 = np.asarray(q99, dtype=np.float64)
        if self.q01.shape != self.q99.shape or self.q01.ndim != 1:
            raise DataError(f"state statistics: q01 and q99 must be equal-length lists, got {self.q01.shape} and "
                            f"{self.q99.shape}")
        self.span = self.q99 - self.q01

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> "StateNormalizer":
        return cls(stats["q01"], stats["q99"])

    @property
    def dim(self) -> int:
        return int(self.q01.shape[0])

    def normalize(self, state: Any, where: str = "state") -> np.ndarray:
        x = np.asarray(state, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.dim:
            raise DataError(f"{where}: the state has {x.shape[0]} values, its statistics {self.dim}")
        safe = np.where(self.span > 0, self.span, 1.0)
        out = np.where(self.span > 0, 2.0 * (x - self.q01) / safe - 1.0, 0.0)
        return np.clip(out, -1.0, 1.0).astype(np.float32)


def discretize(normalized: np.ndarray, bins: int) -> np.ndarray:
    """Bin index 0..bins-1 of each value in [-1, 1] (equal-width bins; +1 falls in the last)."""
    idx = np.floor((np.asarray(normalized, dtype=np.float64) + 1.0) / 2.0 * bins).astype(np.int64)
    return np.clip(idx, 0, bins - 1)


def state_text(normalized: np.ndarray, bins: int) -> str:
    return " ".join(str(int(i)) for i in discretize(normalized, bins))


# -- statistics ---------------------------------------------------------------------------------
def iter_states(folder: str | Path) -> Iterator[tuple[np.ndarray, str]]:
    """(state, "shard file, sample i") of every robot sample holding one, in shard order."""
    from vla_scale.data.streaming_compat import import_streaming

    import_streaming()
    from streaming.base.format.mds.encodings import mds_decode

    folder = Path(folder)
    try:
        shards = json.loads((folder / "index.json").read_text())["shards"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{folder / 'index.json'}: cannot read the shard index ({e})") from None
    for shard in shards:
        names, sizes, encodings = shard["column_names"], shard["column_sizes"], shard["column_encodings"]
        if "state" not in names:
            raise DataError(f"{folder}: shard {shard['raw_data']['basename']} has no 'state' column")
        raw = folder / shard["raw_data"]["basename"]
        if not raw.is_file():
            raise DataError(f"{folder}: shard file {raw.name} is missing (state statistics read uncompressed shards)")
        var = [i for i, s in enumerate(sizes) if s is None]
        want = {names.index("state"), names.index("task")}
        with open(raw, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            n = int(np.frombuffer(buf[0:4], np.uint32)[0])
            offsets = np.frombuffer(buf[4:4 + 4 * (n + 1)], np.uint32).astype(np.int64)
            for i in range(n):
                begin = int(offsets[i])
                col = list(sizes)
                for j, s in zip(var, np.frombuffer(buf[begin:begin + 4 * len(var)], np.uint32)):
                    col[j] = int(s)
                starts = np.cumsum([begin + 4 * len(var)] + col[:-1]).tolist()
                vals = {names[k]: mds_decode(encodings[k], buf[starts[k]:starts[k] + col[k]]) for k in want}
                if vals["task"] != ROBOT_TASK:
                    continue
                st = optional_array(vals["state"])
                if st is not None:
                    yield np.asarray(st, dtype=np.float32), f"{raw}, sample {i}"


def compute_state_stats(folder: str | Path) -> dict[str, Any]:
    from vla_scale.data.stats import ActionStatistics

    acc, rows, dim = ActionStatistics(), [], None
    for st, where in iter_states(folder):
        if dim is None:
            dim = st.shape[0]
        elif st.shape[0] != dim:
            raise DataError(f"{where}: the state has {st.shape[0]} values, earlier samples {dim}")
        rows.append(st)
        if len(rows) >= 65536:
            acc.update(np.stack(rows))
            rows = []
    if rows:
        acc.update(np.stack(rows))
    if dim is None:
        raise DataError(f"{folder}: no robot sample holds a state; set data.state=none or convert with a state key")
    full = acc.result()
    return {"q01": full["q01"], "q99": full["q99"], "mean": full["mean"], "std": full["std"], "dim": full["dim"]}
