"""Per-dimension action normalization with the dataset's 1st/99th percentiles.

This is the one place where raw robot actions and the model's [-1, 1] action
space meet: the data pipeline normalizes with it, the policy unnormalizes
with it, and the statistics travel with checkpoints and exports as the plain
dict `to_stats()` returns. Dimensions whose mask is False (the 0/1 gripper)
pass through untouched in both directions.

It must never invent statistics (it only computes them when asked to, from
the actions it is given) and never divide by a zero range: a dimension whose
q01 equals its q99 normalizes to 0 and unnormalizes back to that value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from vla_scale.errors import DataError

# A q99 - q01 range at or below this is treated as a constant dimension.
_DEGENERATE_RANGE = 1e-8


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch"


@dataclass(frozen=True, eq=False)
class ActionNormalizer:
    """Maps actions between the dataset's units and [-1, 1], dimension by dimension."""

    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray  # bool per dimension; False: kept as is (e.g. the gripper)

    def __post_init__(self) -> None:
        q01 = np.asarray(self.q01, dtype=np.float64).reshape(-1)
        q99 = np.asarray(self.q99, dtype=np.float64).reshape(-1)
        mask = np.asarray(self.mask, dtype=bool).reshape(-1)
        if not (q01.shape == q99.shape == mask.shape):
            raise DataError(
                f"action stats disagree on the number of dimensions: q01 has {q01.size}, "
                f"q99 has {q99.size}, mask has {mask.size}"
            )
        for name, values in (("q01", q01), ("q99", q99)):
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise DataError(f"action stats: {name}[{bad[0]}] is {values[bad[0]]}; statistics must be finite")
        inverted = np.flatnonzero(q01 > q99)
        if inverted.size:
            k = inverted[0]
            raise DataError(f"action stats: dimension {k} has q01 {q01[k]} > q99 {q99[k]}; were they swapped?")
        object.__setattr__(self, "q01", q01)
        object.__setattr__(self, "q99", q99)
        object.__setattr__(self, "mask", mask)

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> "ActionNormalizer":
        """From a stats dict with `q01`, `q99` and optional `mask` (extra keys such as mean/std are ignored)."""
        missing = [key for key in ("q01", "q99") if key not in stats]
        if missing:
            raise DataError(f"action stats lack {missing}; expected per-dimension lists 'q01' and 'q99'")
        q01 = np.asarray(stats["q01"], dtype=np.float64).reshape(-1)
        mask = stats.get("mask")
        return cls(q01, stats["q99"], np.ones(q01.size, bool) if mask is None else mask)

    @classmethod
    def from_actions(cls, actions: np.ndarray, mask: Sequence[bool] | None = None) -> "ActionNormalizer":
        """Statistics of raw actions of shape (..., D): 1st and 99th percentiles per dimension."""
        flat = np.asarray(actions, dtype=np.float64)
        flat = flat.reshape(-1, flat.shape[-1])
        if flat.shape[0] == 0:
            raise DataError("cannot compute action stats from zero actions")
        if not np.isfinite(flat).all():
            row, k = np.argwhere(~np.isfinite(flat))[0]
            raise DataError(f"cannot compute action stats: action {row}, dimension {k} is {flat[row, k]}")
        q01, q99 = np.quantile(flat, [0.01, 0.99], axis=0)
        return cls(q01, q99, np.ones(flat.shape[1], bool) if mask is None else mask)

    def to_stats(self) -> dict[str, list]:
        """The JSON-ready dict `from_stats` reads back."""
        return {"q01": self.q01.tolist(), "q99": self.q99.tolist(), "mask": self.mask.tolist()}

    @property
    def dim(self) -> int:
        return int(self.q01.size)

    def normalize(self, actions):
        """Raw actions (..., D) -> [-1, 1], clipped; masked-out dimensions unchanged. numpy or torch in, same out."""
        return self._apply(actions, self._normalize)

    def unnormalize(self, actions):
        """Normalized actions (..., D) -> raw units; the inverse of `normalize` on [-1, 1]."""
        return self._apply(actions, self._unnormalize)

    def _normalize(self, a: np.ndarray) -> np.ndarray:
        span = self.q99 - self.q01
        constant = span <= _DEGENERATE_RANGE
        scaled = 2.0 * (a - self.q01) / np.where(constant, 1.0, span) - 1.0
        scaled = np.clip(np.where(constant, 0.0, scaled), -1.0, 1.0)
        return np.where(self.mask, scaled, a)

    def _unnormalize(self, a: np.ndarray) -> np.ndarray:
        raw = 0.5 * (a + 1.0) * (self.q99 - self.q01) + self.q01
        return np.where(self.mask, raw, a)

    def _apply(self, actions, fn):
        if _is_torch(actions):
            import torch

            values = actions.detach().to("cpu", torch.float64).numpy()
            return torch.from_numpy(self._checked(fn, values)).to(device=actions.device, dtype=actions.dtype)
        values = np.asarray(actions)
        dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64
        return self._checked(fn, values.astype(np.float64)).astype(dtype)

    def _checked(self, fn, values: np.ndarray) -> np.ndarray:
        if values.ndim == 0 or values.shape[-1] != self.dim:
            raise ValueError(f"actions of shape {values.shape} do not end in the {self.dim} action dimensions")
        return fn(values)


def check_raw_dims(stats: Mapping[str, Any], binarize_threshold: float | None, where: str) -> None:
    """DataError when a dimension kept raw (mask False) holds values outside [-1, 1].

    Raw values reach the action text as they are, and the text clips to
    [-1, 1]: a 0-85 gripper would train as a constant 1 without a word. With
    `binarize_threshold` those dimensions are mapped to 0/1 (`binarize`) first.
    Statistics without min/max cannot be checked here; `SampleProcessor`
    checks each action then.
    """
    mask = stats.get("mask")
    if mask is None:
        return
    raw = [k for k, m in enumerate(mask) if not m]
    if binarize_threshold is not None:
        if not raw:
            raise DataError(f"{where}: binarize_threshold is set but no dimension is kept raw (the stats' mask is "
                            f"all true); name the gripper in actions.keep_dims and recompute the statistics")
        return
    if "min" not in stats or "max" not in stats:
        return
    for k in raw:
        lo, hi = float(stats["min"][k]), float(stats["max"][k])
        if lo < -1.0 or hi > 1.0:
            raise DataError(
                f"{where}: action dimension {k} is kept raw (mask false: actions.keep_dims or a detected 0/1 "
                f"dimension) but its values span [{lo:g}, {hi:g}], outside [-1, 1], and would be clipped; map it "
                f"to 0/1 with binarize_threshold on the source (e.g. {(lo + hi) / 2:g}), or normalise it (leave it "
                f"out of actions.keep_dims and recompute the statistics)"
            )


def binarize(actions: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """Kept-raw dimensions (mask False) of raw actions (..., D) -> 1.0 above `threshold`, else 0.0."""
    out = np.array(actions, dtype=np.float32, copy=True)
    raw = ~np.asarray(mask, dtype=bool)
    out[..., raw] = (out[..., raw] > threshold).astype(np.float32)
    return out

