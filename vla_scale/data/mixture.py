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


def smallest_batch_including(weights: list[float], index: int, start: int = 1, limit: int = 1 << 20) -> int | None:
    """The smallest global batch (>= start) in which source `index` gets at least one sample."""
    for b in range(max(1, start), limit + 1):
        if batch_counts(weights, b)[index] > 0:
            return b
    return None


def slice_counts(counts: list[int], ranks: int, micro_per_rank: int) -> np.ndarray:
    """Per-(rank, micro-batch) source counts of one global batch: shape (ranks, micro_per_rank, sources).

    Every rank gets floor or ceil of counts[s] / ranks of each source, and every micro-batch floor or
    ceil of counts[s] / (ranks x micro_per_rank); rows add up to the slice sizes and the whole to
    `counts` exactly. Rule: each micro-batch slot first takes the floor share; the remainders of all
    sources, listed source by source, are then dealt to the slots one at a time in the order
    (micro 0 of rank 0, micro 0 of rank 1, ..., micro 1 of rank 0, ...). A source's remainder is
    smaller than the number of slots, so it lands on distinct slots, and dealing across ranks first
    spreads it over ranks as evenly as possible. Deterministic: a function of the counts and shape only.
    """
    c = np.asarray(counts, dtype=np.int64)
    slots = ranks * micro_per_rank
    if c.sum() % slots:
        raise ValueError(f"a global batch of {int(c.sum())} does not split into {ranks} ranks x "
                         f"{micro_per_rank} micro-batches")
    out = np.repeat((c // slots)[None, :], slots, axis=0)  # slot-major: slot j = (micro j // ranks, rank j % ranks)
    j = 0
    for s, r in enumerate(c % slots):
        for _ in range(int(r)):
            out[j % slots, s] += 1
            j += 1
    # slot j -> (rank j % ranks, micro j // ranks)
    return out.reshape(micro_per_rank, ranks, len(c)).transpose(1, 0, 2)


def mixing_permutation(stream_of_position: np.ndarray, ranks: int, micro_per_rank: int) -> np.ndarray:
    """Positions of one global batch reordered so that contiguous rank slices (and micro-batches) are mixed.

    `stream_of_position[i]` is the source of the sample at position i of the global batch. Returns
    `perm` with `batch[perm]` laid out rank by rank, micro-batch by micro-batch, each slice holding
    the counts of `slice_counts`. Within a source the original order is kept.
    """
    streams = np.asarray(stream_of_position)
    n_streams = int(streams.max()) + 1
    counts = np.bincount(streams, minlength=n_streams)
    plan = slice_counts(counts.tolist(), ranks, micro_per_rank)
    queues = [np.flatnonzero(streams == s).tolist() for s in range(n_streams)]
    taken = [0] * n_streams
    perm = []
    for r in range(ranks):
        for g in range(micro_per_rank):
            for s in range(n_streams):
                k = int(plan[r, g, s])
                perm.extend(queues[s][taken[s]:taken[s] + k])
                taken[s] += k
    return np.asarray(perm, dtype=np.int64)
