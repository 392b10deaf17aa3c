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
are never read or decoded), after the shard is checked against the size and
hash in index.json; a damaged shard is an error naming it (and the sample
where the damage is in the sample layout). The folder may be a remote URL
(shards downloaded one at a time, stats.json uploaded beside them).

Non-finite actions and absurd ones (beyond `outlier_factor` robust ranges,
see `outlier_fence`) are not statistics of the robot: they are left out and
reported by shard, sample, episode and step under "outliers". This module
never modifies the shards.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from vla_scale.data.schema import ROBOT_TASK, STATS_FILE
from vla_scale.data.storage import ShardFolder, is_remote, join
from vla_scale.data.streaming_compat import import_streaming
from vla_scale.errors import DataError

DEFAULT_BINS = 16384
# Actions beyond this many robust ranges (q99 - q01) outside [q01, q99] are reported and left out.
DEFAULT_OUTLIER_FACTOR = 10.0
_MAX_OUTLIERS = 50  # examples kept in stats.json; the count is exact
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
@dataclass(frozen=True)
class ActionRecord:
    """One robot sample's action as stored, and where it is: shard file, sample, episode and step."""

    action: np.ndarray
    where: str
    episode: int
    step: int


def _check_index(folder: ShardFolder, shards: list[dict[str, Any]]) -> None:
    for s in shards:
        if s.get("format") != "mds" or "action" not in s.get("column_names", []):
            raise DataError(f"{join(folder.path, 'index.json')}: shard {s.get('raw_data', {}).get('basename')} is not "
                            f"an MDS shard with an 'action' column")


def _samples(buf: Any, shard: dict[str, Any], name: str) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(sample index, {column: raw bytes}) of the columns stats reads, with every offset bounds-checked, so a
    damaged shard is a DataError naming the shard and the sample instead of garbage or a TypeError."""
    names, sizes = shard["column_names"], shard["column_sizes"]
    wanted = [c for c in ("task", "action", "episode", "step") if c in names]
    var = [i for i, sz in enumerate(sizes) if sz is None]
    total = len(buf)
    expected = int(shard.get("samples", -1))
    if total < 4:
        raise DataError(f"{name}: the shard file is truncated ({total} bytes): no sample can be read")
    n = int(np.frombuffer(buf[0:4], np.uint32)[0])
    if expected >= 0 and n != expected:
        raise DataError(f"{name}: the shard header says {n} samples, index.json says {expected}: the file is damaged")
    if 4 + 4 * (n + 1) > total:
        raise DataError(f"{name}: the shard file is truncated ({total} bytes) inside its table of sample offsets")
    offsets = np.frombuffer(buf[4:4 + 4 * (n + 1)], np.uint32).astype(np.int64)
    for i in range(n):
        begin, end = int(offsets[i]), int(offsets[i + 1])
        if end > total:
            raise DataError(f"{name}, sample {i}: the shard file is truncated: the sample ends at byte {end}, the "
                            f"file has {total} bytes ({n - i} of {n} samples are cut off); re-convert or re-upload")
        if begin < 4 + 4 * (n + 1) or end < begin + 4 * len(var):
            raise DataError(f"{name}, sample {i}: the shard's sample offsets are damaged ({begin}..{end})")
        col_sizes = list(sizes)
        for j, sz in zip(var, np.frombuffer(buf[begin:begin + 4 * len(var)], np.uint32)):
            col_sizes[j] = int(sz)
        if begin + 4 * len(var) + sum(col_sizes) != end:
            raise DataError(f"{name}, sample {i}: the sample's column sizes do not add up to its length: the shard "
                            f"is damaged")
        starts = np.cumsum([begin + 4 * len(var)] + col_sizes[:-1]).tolist()
        yield i, {c: buf[starts[names.index(c)]:starts[names.index(c)] + col_sizes[names.index(c)]] for c in wanted}


def iter_robot_actions(folder: str | Path) -> Iterator[ActionRecord]:
    """Every robot sample's action with where it is, in shard order (local folder or remote URL).

    Each shard is checked against index.json first (size, and hash when written with one), and every
    sample's offsets are bounds-checked, so corrupt and truncated shards are errors naming the shard
    (and the sample, where the damage is in the sample layout)."""
    import_streaming()
    from streaming.base.format.mds.encodings import mds_decode

    src = folder if isinstance(folder, ShardFolder) else ShardFolder(folder)
    try:
        shards = src.index()
        _check_index(src, shards)
        for shard in shards:
            encodings = dict(zip(shard["column_names"], shard["column_encodings"]))
            name = join(src.path, shard["raw_data"]["basename"])
            with src.shard_bytes(shard) as buf:
                for i, cols in _samples(buf, shard, name):
                    where = f"{name}, sample {i}"
                    try:
                        if "task" in cols and mds_decode(encodings["task"], bytes(cols["task"])) != ROBOT_TASK:
                            continue
                        action = mds_decode(encodings["action"], bytes(cols["action"]))
                        episode = int(mds_decode(encodings["episode"], bytes(cols["episode"]))) if "episode" in cols \
                            else -1
                        step = int(mds_decode(encodings["step"], bytes(cols["step"]))) if "step" in cols else -1
                    except (ValueError, TypeError, UnicodeDecodeError) as e:
                        raise DataError(f"{where}: cannot decode the sample ({e}): the shard is damaged") from None
                    yield ActionRecord(np.asarray(action), where, episode, step)
    finally:
        if src is not folder:
            src.close()


def outlier_fence(q01: np.ndarray, q99: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Values outside [q01 - f*r, q99 + f*r], r = q99 - q01 (floored so constant dimensions get a margin),
    are absurd for a dimension: far beyond anything the robust range allows."""
    scale = np.maximum(np.maximum(np.abs(q01), np.abs(q99)), 1.0)
    r = np.maximum(q99 - q01, 1e-3 * scale)
    return q01 - factor * r, q99 + factor * r


class _Reservoir:
    """A uniform random sample of at most `size` action rows (bottom-k of random keys), for a robust fence
    that absurd values cannot move. Deterministic (fixed seed)."""

    def __init__(self, size: int = 1 << 15) -> None:
        self.size = size
        self.rng = np.random.default_rng(0)
        self.keys = np.empty(0)
        self.rows: np.ndarray | None = None

    def update(self, rows: np.ndarray) -> None:
        keys = self.rng.random(rows.shape[0])
        allk = np.concatenate([self.keys, keys])
        allr = rows if self.rows is None else np.concatenate([self.rows, rows])
        if allk.size > self.size:
            keep = np.argpartition(allk, self.size)[:self.size]
            allk, allr = allk[keep], allr[keep]
        self.keys, self.rows = allk, allr


def _nonfinite_or_absurd(a: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None,
                         binary: np.ndarray | None) -> str | None:
    flat = a.reshape(-1, a.shape[-1])
    bad = ~np.isfinite(flat)
    if bad.any():
        t, k = (int(x) for x in np.argwhere(bad)[0])
        return f"non-finite value {flat[t, k]} in dimension {k}" + (f" (chunk row {t})" if a.ndim == 2 else "")
    if lo is None or hi is None:
        return None
    out = (flat < lo) | (flat > hi)
    if binary is not None:
        out &= ~binary
    if out.any():
        t, k = (int(x) for x in np.argwhere(out)[0])
        return (f"absurd value {float(flat[t, k]):.6g} in dimension {k} (outside [{lo[k]:.6g}, {hi[k]:.6g}])"
                + (f" (chunk row {t})" if a.ndim == 2 else ""))
    return None


def compute_action_stats(folder: str | Path, *, keep_dims: Sequence[int] | None = None, bins: int = DEFAULT_BINS,
                         progress: bool = False, outlier_factor: float = DEFAULT_OUTLIER_FACTOR) -> dict[str, Any]:
    """Statistics of the robot actions in one shard folder, local or remote (bounded memory).

    Actions that are non-finite, or beyond `outlier_factor` times the robust q01-q99 range (a
    corrupt value, a unit error), are left out of the statistics and listed under "outliers" by
    dataset position (shard, sample, episode, step). One pass when there are none; a second pass
    (over the same shards) when there are, so that they cannot widen the quantile sketch.
    """
    from tqdm.auto import tqdm

    import_streaming()  # imports torch (seconds): before the progress bar starts, not inside its first step
    if not outlier_factor > 0:
        raise DataError(f"the outlier factor must be positive, got {outlier_factor}")
    src = ShardFolder(folder)
    try:
        total = sum(int(s.get("samples", 0)) for s in src.index())

        def one_pass(lo: np.ndarray | None, hi: np.ndarray | None, binary: np.ndarray | None, desc: str):
            acc, res = ActionStatistics(bins), _Reservoir()
            rows: list[np.ndarray] = []
            pending, dim, samples = 0, None, 0
            outliers: list[dict[str, Any]] = []
            n_out = 0
            for rec in tqdm(iter_robot_actions(src), total=total, unit="sample", desc=desc, disable=not progress):
                a = np.asarray(rec.action, dtype=np.float32)
                if a.ndim not in (1, 2):
                    raise DataError(f"{rec.where}: action has shape {a.shape}; expected (D,) or (T, D)")
                if dim is None:
                    dim = a.shape[-1]
                elif a.shape[-1] != dim:
                    raise DataError(f"{rec.where}: action has {a.shape[-1]} dimensions, earlier samples have {dim}; "
                                    f"a shard folder must hold one action space (convert datasets into separate "
                                    f"folders)")
                reason = _nonfinite_or_absurd(a, lo, hi, binary)
                if reason is not None:
                    n_out += 1
                    if len(outliers) < _MAX_OUTLIERS:
                        outliers.append({"where": rec.where, "episode": rec.episode, "step": rec.step,
                                         "reason": reason})
                    continue
                rows.append(a.reshape(-1, dim).astype(np.float64))
                pending += rows[-1].shape[0]
                samples += 1
                if pending >= _BATCH:
                    block = np.concatenate(rows)
                    acc.update(block)
                    res.update(block)
                    rows, pending = [], 0
            if rows:
                block = np.concatenate(rows)
                acc.update(block)
                res.update(block)
            return acc, res, samples, n_out, outliers

        acc, res, samples, n_out, outliers = one_pass(None, None, None, f"stats {src.name}")
        if acc.sketch is not None and res.rows is not None:
            lo, hi = outlier_fence(np.quantile(res.rows, QUANTILES[0], axis=0),
                                   np.quantile(res.rows, QUANTILES[1], axis=0), outlier_factor)
            binary = acc.binary & acc.seen.all(axis=0)
            if ((acc.sketch.min < lo) & ~binary).any() or ((acc.sketch.max > hi) & ~binary).any():
                acc, _, samples, n_absurd, outliers2 = one_pass(lo, hi, binary, f"stats {src.name} (outliers)")
                n_out, outliers = n_absurd, outliers2
        stats = acc.result(keep_dims)
    finally:
        src.close()
    stats.update({"samples": samples, "shards": src.path if src.remote else str(Path(src.path).resolve()),
                  "bins": bins, "format": "vla-scale action stats v1",
                  "outliers": {"count": n_out, "factor": outlier_factor, "examples": outliers}})
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
    """A stats.json, or the stats.json inside a shard folder; either may be a remote URL."""
    if is_remote(path):
        url = str(path).rstrip("/")
        folder, name = (url.rsplit("/", 1) if url.endswith(".json") else (url, STATS_FILE))
        data = ShardFolder(folder).read_file(name, missing_ok=True)
        if data is None:
            raise DataError(f"{join(folder, name)} is missing: run `vla-scale stats {folder}`")
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise DataError(f"{join(folder, name)}: cannot read the statistics: {e}") from None
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run `vla-scale stats {path.parent}`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the statistics: {e}") from None


def read_folder_stats(folder: str | Path) -> dict[str, Any] | None:
    """FOLDER/stats.json (local or remote) if it exists, else None."""
    if is_remote(folder):
        src = ShardFolder(folder)
        try:
            data = src.read_file(STATS_FILE, missing_ok=True)
        finally:
            src.close()
        return None if data is None else load_stats_bytes(data, join(str(folder), STATS_FILE))
    path = Path(folder) / STATS_FILE
    return load_stats(path) if path.is_file() else None


def load_stats_bytes(data: bytes, where: str) -> dict[str, Any]:
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: cannot read the statistics: {e}") from None


def stats_for_shards(folder: str | Path, *, out: str | Path | None = None, keep_dims: Sequence[int] | None = None,
                     bins: int = DEFAULT_BINS, progress: bool = False,
                     outlier_factor: float = DEFAULT_OUTLIER_FACTOR) -> tuple[dict[str, Any], Path | str]:
    """Compute and write a folder's statistics (default: FOLDER/stats.json, uploaded when FOLDER is a URL).
    Returns (stats, where they were written)."""
    stats = compute_action_stats(folder, keep_dims=keep_dims, bins=bins, progress=progress,
                                 outlier_factor=outlier_factor)
    if out is None and is_remote(folder):
        src = ShardFolder(folder)
        try:
            return stats, src.write_file(STATS_FILE, (json.dumps(stats, indent=2) + "\n").encode())
        finally:
            src.close()
    return stats, write_stats(stats, out if out is not None else Path(folder) / STATS_FILE)
