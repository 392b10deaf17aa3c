"""Success statistics of an evaluation: Wilson intervals, per task, per variant, and variant aggregation.

- `wilson(k, n)`: the Wilson score interval for a binomial proportion (95%
  by default). Unlike the normal approximation it stays inside [0, 1] and
  is informative at 0/n and n/n, which small robot evaluations often hit.
- `summarize(results, variants)`: cells of (task, variant), pooled per
  task, per variant and overall, each with n, successes, rate, the Wilson
  interval and mean episode lengths; plus `variant_mean`, the mean over
  the variants of their success rates (SimplerEnv's "variant
  aggregation": each visual condition weighs the same, however many
  episodes it ran). With one variant it equals the pooled rate.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for `successes` out of `n` (n = 0 gives the vacuous (0, 1))."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # Exact at the ends (the closed form gives 1 - 1e-16 for n/n): the interval always contains the estimate.
    return (0.0 if successes == 0 else min(lo, p)), (1.0 if successes == n else max(hi, p))


def cell(results: Iterable[Any]) -> dict[str, Any]:
    """n, successes, rate, Wilson 95% interval and mean episode lengths of a set of episode results."""
    results = list(results)
    n = len(results)
    k = sum(bool(r.success) for r in results)
    lo, hi = wilson(k, n)
    won = [r.steps for r in results if r.success]
    return {"n": n, "successes": k, "rate": k / n if n else 0.0, "ci95": [lo, hi],
            "mean_steps": sum(r.steps for r in results) / n if n else 0.0,
            "mean_steps_success": sum(won) / len(won) if won else None}


def summarize(results: Sequence[Any], variants: Sequence[str]) -> dict[str, Any]:
    """Per (task, variant) cells, per-task and per-variant pools, the overall pool and the variant means."""
    tasks = list(dict.fromkeys(r.task for r in results))
    variants = [v for v in variants if any(r.variant == v for r in results)]
    by = lambda t=None, v=None: [r for r in results if (t is None or r.task == t) and (v is None or r.variant == v)]  # noqa: E731

    def variant_mean(t: str | None) -> float:
        rates = [cell(by(t, v))["rate"] for v in variants if by(t, v)]
        return sum(rates) / len(rates) if rates else 0.0

    return {
        "overall": {**cell(results), "variant_mean": variant_mean(None)},
        "variants": {v: cell(by(None, v)) for v in variants},
        "tasks": {t: {**cell(by(t)), "variant_mean": variant_mean(t),
                      "variants": {v: cell(by(t, v)) for v in variants if by(t, v)}} for t in tasks},
    }
