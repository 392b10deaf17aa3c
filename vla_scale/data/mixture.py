"""Co-training mixture: which sample of which source goes into every global batch.

Each global batch holds exactly round(weight x batch) samples of each source
(largest-remainder rounding, so the counts always sum to the batch size):
the paper mixes per batch, not only on average. Each source walks its own
seeded permutation, epoch after epoch; a source that runs out starts a new
epoch (a repeat, which is logged). The state is a few integers, so a resumed
run continues at exactly the next sample. This module decides indices only:
it never reads or decodes a sample.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


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


@dataclass
class _Cursor:
    epoch: int = 0
    pos: int = 0


@dataclass
class CoTrainingMixture:
    names: list[str]
    sizes: list[int]
    weights: list[float]
    global_batch_size: int
    seed: int = 0
    batches: int = 0
    cursors: list[_Cursor] = field(default_factory=list)

    def __post_init__(self):
        if not self.cursors:
            self.cursors = [_Cursor() for _ in self.names]
        self.counts = batch_counts(self.weights, self.global_batch_size)
        for name, size, count in zip(self.names, self.sizes, self.counts):
            if count and size == 0:
                raise ValueError(f"data source '{name}' is empty but has weight in the mixture")
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != s}
            self._perm_cache[key] = np.random.default_rng([self.seed, s, epoch]).permutation(self.sizes[s])
        return self._perm_cache[key]

    def next_batch(self) -> list[tuple[int, int]]:
        """(source index, sample index) pairs for the next global batch, interleaved by source."""
        per_source: list[list[tuple[int, int]]] = []
        for s, count in enumerate(self.counts):
            picks = []
            cur = self.cursors[s]
            for _ in range(count):
                if cur.pos >= self.sizes[s]:
                    cur.epoch += 1
                    cur.pos = 0
                    log.info("data source '%s' exhausted: repeating (epoch %d)", self.names[s], cur.epoch)
                picks.append((s, int(self._perm(s, cur.epoch)[cur.pos])))
                cur.pos += 1
            per_source.append(picks)
        self.batches += 1
        # Spread sources evenly through the batch so every micro-batch and rank slice is mixed too.
        flat = [p for picks in per_source for p in picks]
        keys = [((j + 0.5) / len(picks), s) for s, picks in enumerate(per_source) for j in range(len(picks))]
        return [flat[i] for i in sorted(range(len(flat)), key=lambda i: keys[i])]

    def state_dict(self) -> dict:
        return {"batches": self.batches, "cursors": [[c.epoch, c.pos] for c in self.cursors],
                "names": list(self.names), "sizes": list(self.sizes), "counts": list(self.counts),
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state["counts"] != self.counts or state["seed"] != self.seed:
            raise ValueError(
                f"data state does not match this mixture: saved sources {state['names']} with per-batch "
                f"counts {state['counts']} (seed {state['seed']}), now {self.names} {self.counts} "
                f"(seed {self.seed})"
            )
        self.batches = int(state["batches"])
        self.cursors = [_Cursor(int(e), int(p)) for e, p in state["cursors"]]
