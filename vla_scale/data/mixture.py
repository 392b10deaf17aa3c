"""Co-training mixture weights -> exact per-batch sample counts.

Each global batch holds exactly round(weight x batch) samples of each source
(largest-remainder rounding, so the counts always sum to the batch size):
the paper mixes per batch, not only on average. The streaming loader turns
these counts into stream proportions for stratified batching. The one home
of that rounding rule.
"""
from __future__ import annotations

import numpy as np


def batch_counts(weights: list[float], batch_size: int) -> list[int]:
    """Per-source sample counts for one batch: round(w_i x B), summing exactly to B."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    exact = w * batch_size
    counts = np.floor(exact).astype(int)
    remainder = batch_size - counts.sum()
    # Largest remainders first; ties go to the earlier source (deterministic).
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts.tolist()
