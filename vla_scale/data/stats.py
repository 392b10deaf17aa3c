"""Action statistics of a shard folder: one streaming pass, bounded memory, into stats.json.

`vla-scale stats SHARDS` reads the `action` column of every robot sample
(chunks (T, D) flattened to T rows of D) and writes, beside the shards,
per-dimension q01, q99, mean, std (population, ddof=0), min, max, the count,
and `mask` (False for dimensions kept raw: gripper-like dimensions whose
values are 0 and 1 and nothing else, or those named by --keep-dims). The top-level keys
are what `ActionNormalizer.from_stats` reads; each robot dataset gets its
own stats.json beside its own shards.

Quantiles come from `AlignedHistogram`, a mergeable sketch with a proven
error bound: per dimension, B counting bins of width w = 2^k on the grid
aligned at multiples of w (bin i holds [i*w, (i+1)*w)). Binning x/w with w a
power of two is exact in floating point, so every count sits in exactly the
right bin. When new values no longer fit in B bins, k grows to the smallest
exponent that fits and bins merge exactly (bin i -> bin floor(i / 2^j)):
re-binning loses nothing beyond the final bin width. The estimate of an
order statistic is its bin's centre clipped to the smallest and largest value
seen in that bin (so it is exact when a bin holds one distinct value, as
for gripper, constant or quantised dimensions, and at the two ends), and
numpy's linear interpolation between two order statistics is applied to the
estimates, so

    |q_hat - q_numpy| <= w / 2 < range / (B - 2)        (B = 16384: 6.1e-5 x range)

where range = max - min of that dimension (plus a floor of max|x| * 2^-52,
which keeps bin indices exact in int64 and is far below float32 resolution).
Each sample's action is read straight from the MDS shard (the image columns
are never read or decoded). This module never modifies the shards.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import secrets
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from vla_scale.data.schema import ROBOT_TASK, STATS_FILE
from vla_scale.errors import DataError

DEFAULT_BINS = 16384
QUANTILES = (0.01, 0.99)
_BATCH = 8192  # action rows per sketch update


class AlignedHistogram:
    """Per-dimension streaming quantile sketch over power-of-two aligned bins (see the module docstring)."""

    def __init__(self, dim: int, bins: int = DEFAULT_BINS) -> None:
        if bins < 16:
            raise ValueError("bins must be at least 16")
        self.dim, self.bins = dim, bins
        self.exponent = np.zeros(dim, dtype=np.int64)  # bin width 2**exponent
        self.first = np.zeros(dim, dtype=np.int64)  # grid index of counts[:, 0]
        self.counts = np.zeros((dim, bins), dtype=np.int64)
        self.bin_min = np.full((dim, bins), np.inf)  # smallest value seen in each bin
        self.bin_max = np.full((dim, bins), -np.inf)
        self.min = np.full(dim, np.inf)
        self.max = np.full(dim, -np.inf)
        self.n = 0

    @staticmethod
    def _index(x: np.ndarray | float, k: int) -> np.ndarray:
        return np.floor(np.ldexp(x, -k)).astype(np.int64)  # ldexp by a power of two: exact

    def _fits(self, lo: float, hi: float, k: int) -> bool:
        return int(self._index(hi, k) - self._index(lo, k)) + 1 <= self.bins

    def _exponent_for(self, lo: float, hi: float, at_least: int | None) -> int:
        # Floor keeping |x| / w below 2**52: grid indices stay exact integers in float64 and int64.
        k = math.frexp(max(abs(lo), abs(hi)))[1] - 52
        span = hi - lo
        if span > 0:  # w >= span / bins is necessary to fit, so start there and step up
            k = max(k, math.floor(math.log2(span / self.bins)))
        if at_least is not None:
            k = max(k, at_least)
        while not self._fits(lo, hi, k):
            k += 1
        return k

    def _rebin(self, d: int, k: int, first: int) -> None:
        nz = np.flatnonzero(self.counts[d])
        old = self.first[d] + nz
        new = np.right_shift(old, k - self.exponent[d]) - first  # arithmetic shift = floor division by 2**j
        row = np.zeros(self.bins, dtype=np.int64)
        np.add.at(row, new, self.counts[d, nz])
        lo, hi = np.full(self.bins, np.inf), np.full(self.bins, -np.inf)
        np.minimum.at(lo, new, self.bin_min[d, nz])
        np.maximum.at(hi, new, self.bin_max[d, nz])
        self.counts[d], self.bin_min[d], self.bin_max[d] = row, lo, hi
        self.exponent[d], self.first[d] = k, first

    def update(self, x: np.ndarray) -> None:
        """Add rows x of shape (N, dim); values must be finite."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        if x.shape[0] == 0:
            return
        for d in range(self.dim):
            col = x[:, d]
            lo, hi = min(self.min[d], col.min()), max(self.max[d], col.max())
            if self.n == 0:
                k = self._exponent_for(lo, hi, None)
                self.exponent[d], self.first[d] = k, int(self._index(lo, k))
            elif lo < self.min[d] or hi > self.max[d]:
                k = self._exponent_for(lo, hi, int(self.exponent[d]))
                first = int(self._index(lo, k))
                if k != self.exponent[d] or first != self.first[d]:
                    self._rebin(d, k, first)
            self.min[d], self.max[d] = lo, hi
            idx = self._index(col, int(self.exponent[d])) - self.first[d]
            self.counts[d] += np.bincount(idx, minlength=self.bins)
            np.minimum.at(self.bin_min[d], idx, col)
            np.maximum.at(self.bin_max[d], idx, col)
        self.n += x.shape[0]

    def merge(self, other: "AlignedHistogram") -> None:
        """Add another sketch's counts (same dim and bins): the result is as if one sketch saw both streams."""
        if (other.dim, other.bins) != (self.dim, self.bins):
            raise ValueError("can only merge sketches with the same dim and bins")
        if other.n == 0:
            return
        if self.n == 0:
            self.__dict__.update({k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in other.__dict__.items()})
            return
        for d in range(self.dim):
            lo, hi = min(self.min[d], other.min[d]), max(self.max[d], other.max[d])
            k = self._exponent_for(lo, hi, int(max(self.exponent[d], other.exponent[d])))
            first = int(self._index(lo, k))
            self._rebin(d, k, first)
            theirs = AlignedHistogram(1, self.bins)
            theirs.counts[0], theirs.exponent[0], theirs.first[0] = other.counts[d], other.exponent[d], other.first[d]
            theirs.bin_min[0], theirs.bin_max[0] = other.bin_min[d], other.bin_max[d]
            theirs._rebin(0, k, first)
            self.counts[d] += theirs.counts[0]
            np.minimum(self.bin_min[d], theirs.bin_min[0], out=self.bin_min[d])
            np.maximum(self.bin_max[d], theirs.bin_max[0], out=self.bin_max[d])
            self.min[d], self.max[d] = lo, hi
        self.n += other.n

    def error_bound(self) -> np.ndarray:
        """Per dimension: the largest possible |estimate - numpy's exact quantile| (half a bin width)."""
        return np.ldexp(0.5, self.exponent)

    def quantile(self, q: float) -> np.ndarray:
        """numpy's default ('linear') quantile, estimated per dimension within `error_bound()`."""
        if self.n == 0:
            raise DataError("no values: cannot compute quantiles")
        h = (self.n - 1) * q
        j = int(math.floor(h))
        frac = h - j
        lower = self._order_statistic(j)
        upper = self._order_statistic(min(j + 1, self.n - 1))
        return lower + frac * (upper - lower)

    def _order_statistic(self, j: int) -> np.ndarray:
        out = np.empty(self.dim)
        for d in range(self.dim):
            if j == 0:
                out[d] = self.min[d]
            elif j == self.n - 1:
                out[d] = self.max[d]
            else:
                b = int(np.searchsorted(np.cumsum(self.counts[d]), j, side="right"))
                centre = np.ldexp(self.first[d] + b + 0.5, int(self.exponent[d]))
                out[d] = min(max(centre, self.bin_min[d, b]), self.bin_max[d, b])
        return out


class ActionStatistics:
    """One pass over action rows: quantile sketch, exact min/max, mean/std (Chan's merge), {0, 1} detection."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        self.bins = bins
        self.sketch: AlignedHistogram | None = None
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.binary: np.ndarray | None = None  # every value so far is 0 or 1
        self.seen = np.zeros((2, 0), dtype=bool)  # [has a 0, has a 1] per dimension

    @property
    def dim(self) -> int | None:
        return None if self.sketch is None else self.sketch.dim

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] == 0:
            return
        if self.sketch is None:
            self.sketch = AlignedHistogram(rows.shape[1], self.bins)
            self.mean = np.zeros(rows.shape[1])
            self.m2 = np.zeros(rows.shape[1])
            self.binary = np.ones(rows.shape[1], dtype=bool)
            self.seen = np.zeros((2, rows.shape[1]), dtype=bool)
        n_b = rows.shape[0]
        mean_b = rows.mean(axis=0)
        m2_b = ((rows - mean_b) ** 2).sum(axis=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.count * n_b / n)
        self.count = n
        self.binary &= np.all((rows == 0) | (rows == 1), axis=0)
        self.seen |= np.stack([(rows == 0).any(axis=0), (rows == 1).any(axis=0)])
        self.sketch.update(rows)

    def result(self, keep_dims: Sequence[int] | None = None) -> dict[str, Any]:
        if self.sketch is None or self.count == 0:
            raise DataError("no robot actions found: stats need at least one robot sample")
        dim = self.sketch.dim
        # Gripper-like: takes both values 0 and 1 and nothing else (a constant 0 is just a constant dimension).
        binary = self.binary & self.seen.all(axis=0)
        if keep_dims is None:
            mask = ~binary
        else:
            bad = [k for k in keep_dims if not 0 <= k < dim]
            if bad:
                raise DataError(f"--keep-dims {bad} out of range: actions have {dim} dimensions (0..{dim - 1})")
            mask = np.ones(dim, dtype=bool)
            mask[list(keep_dims)] = False
        q01, q99 = (self.sketch.quantile(q) for q in QUANTILES)
        return {
            "q01": q01.tolist(), "q99": q99.tolist(),
            "mean": self.mean.tolist(), "std": np.sqrt(self.m2 / self.count).tolist(),
            "min": self.sketch.min.tolist(), "max": self.sketch.max.tolist(),
            "count": int(self.count), "dim": int(dim), "mask": mask.tolist(),
            "binary_dims": np.flatnonzero(binary).tolist(),
            "quantile_error_bound": self.sketch.error_bound().tolist(),
        }


# ---------------------------------------------------------------------------------------------
# reading actions from MDS shards
# ---------------------------------------------------------------------------------------------
def _index(folder: Path) -> list[dict[str, Any]]:
    path = folder / "index.json"
    try:
        shards = json.loads(path.read_text())["shards"]
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {folder} is not a shard folder (write one with `vla-scale convert`)") \
            from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a valid MDS index ({e})") from None
    for s in shards:
        if s.get("format") != "mds" or "action" not in s.get("column_names", []):
            raise DataError(f"{path}: shard {s.get('raw_data', {}).get('basename')} is not an MDS shard with an "
                            f"'action' column")
    return shards


def _shard_bytes(folder: Path, shard: dict[str, Any]):
    """The uncompressed shard as a sliceable buffer: memory-mapped, or decompressed (one shard at a time)."""
    raw = folder / shard["raw_data"]["basename"]
    if raw.is_file():
        with open(raw, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if shard.get("zip_data"):
        from vla_scale.data.streaming_compat import import_streaming

        import_streaming()
        from streaming.base.compression import decompress

        zipped = folder / shard["zip_data"]["basename"]
        try:
            return decompress(shard["compression"], zipped.read_bytes())
        except FileNotFoundError:
            pass
    raise DataError(f"{folder}: shard file {raw.name} is missing")


def iter_robot_actions(folder: str | Path) -> Iterator[tuple[np.ndarray, str]]:
    """(action array as stored, "shard file, sample i") for every robot sample, in shard order."""
    from vla_scale.data.streaming_compat import import_streaming

    import_streaming()
    from streaming.base.format.mds.encodings import mds_decode

    folder = Path(folder)
    for shard in _index(folder):
        names, sizes, encodings = shard["column_names"], shard["column_sizes"], shard["column_encodings"]
        var = [i for i, s in enumerate(sizes) if s is None]
        a_col, t_col = names.index("action"), names.index("task") if "task" in names else None
        buf = _shard_bytes(folder, shard)
        try:
            n = int(np.frombuffer(buf[0:4], np.uint32)[0])
            offsets = np.frombuffer(buf[4:4 + 4 * (n + 1)], np.uint32).astype(np.int64)
            name = shard["raw_data"]["basename"]
            for i in range(n):
                begin = int(offsets[i])
                col_sizes = list(sizes)
                for j, s in zip(var, np.frombuffer(buf[begin:begin + 4 * len(var)], np.uint32)):
                    col_sizes[j] = int(s)
                starts = np.cumsum([begin + 4 * len(var)] + col_sizes[:-1]).tolist()
                if t_col is not None:
                    task = mds_decode(encodings[t_col], buf[starts[t_col]:starts[t_col] + col_sizes[t_col]])
                    if task != ROBOT_TASK:
                        continue
                action = mds_decode(encodings[a_col], buf[starts[a_col]:starts[a_col] + col_sizes[a_col]])
                yield action, f"{folder / name}, sample {i}"
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()


def compute_action_stats(folder: str | Path, *, keep_dims: Sequence[int] | None = None, bins: int = DEFAULT_BINS,
                         progress: bool = False) -> dict[str, Any]:
    """Statistics of the robot actions in one shard folder (one pass, bounded memory)."""
    from tqdm.auto import tqdm

    from vla_scale.data.streaming_compat import import_streaming

    import_streaming()  # imports torch (seconds): before the progress bar starts, not inside its first step
    folder = Path(folder)
    total = sum(int(s.get("samples", 0)) for s in _index(folder))
    acc = ActionStatistics(bins)
    rows: list[np.ndarray] = []
    pending = 0
    dim = None
    samples = 0
    for action, where in tqdm(iter_robot_actions(folder), total=total, unit="sample", desc=f"stats {folder.name}",
                              disable=not progress):
        a = np.asarray(action, dtype=np.float32)
        if a.ndim not in (1, 2):
            raise DataError(f"{where}: action has shape {a.shape}; expected (D,) or (T, D)")
        if dim is None:
            dim = a.shape[-1]
        elif a.shape[-1] != dim:
            raise DataError(f"{where}: action has {a.shape[-1]} dimensions, earlier samples have {dim}; a shard "
                            f"folder must hold one action space (convert datasets into separate folders)")
        if not np.isfinite(a).all():
            raise DataError(f"{where}: action has a non-finite value; re-convert the dataset (converters reject these)")
        rows.append(a.reshape(-1, dim))
        pending += rows[-1].shape[0]
        samples += 1
        if pending >= _BATCH:
            acc.update(np.concatenate(rows))
            rows, pending = [], 0
    if rows:
        acc.update(np.concatenate(rows))
    stats = acc.result(keep_dims)
    stats.update({"samples": samples, "shards": str(folder.resolve()), "bins": bins,
                  "format": "vla-scale action stats v1"})
    return stats


def write_stats(stats: dict[str, Any], path: str | Path) -> Path:
    """Write stats JSON atomically (temporary file, fsync, rename): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w") as f:
            json.dump(stats, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_stats(path: str | Path) -> dict[str, Any]:
    """A stats.json, or the stats.json inside a shard folder."""
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run `vla-scale stats {path.parent}`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the statistics: {e}") from None


def stats_for_shards(folder: str | Path, *, out: str | Path | None = None, keep_dims: Sequence[int] | None = None,
                     bins: int = DEFAULT_BINS, progress: bool = False) -> tuple[dict[str, Any], Path]:
    """Compute and write a folder's statistics (default: FOLDER/stats.json). Returns (stats, path)."""
    stats = compute_action_stats(folder, keep_dims=keep_dims, bins=bins, progress=progress)
    return stats, write_stats(stats, out if out is not None else Path(folder) / STATS_FILE)
