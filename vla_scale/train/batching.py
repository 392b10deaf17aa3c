"""How one global batch is cut over the ranks: the arithmetic of accumulation, in one place.

A run fixes `train.global_batch_size` (samples per optimizer step, all ranks
together: the optimisation is defined by it, and the data order stays the same
when the world size changes) and `train.micro_batch_size` (samples per
forward/backward on one rank: what fits on one device). What is left to the
world size is the number of micro-batches a rank runs before the optimizer
steps:

    global_batch_size = micro_batch_size x gradient_accumulation x world_size

With `train.gradient_accumulation: auto` (the default) the accumulation is
derived from the world size, so the same config trains on 8 or 64 GPUs; with
an int the three must agree. A combination that cannot divide is a
`ConfigError` naming the nearest valid settings for that world size (the
nearest global batch sizes, the micro-batch sizes that divide). The data
loader, the DeepSpeed config and `vla-scale plan` all ask
`resolve_accumulation`, so a world that does not divide is reported by the
planner, by `vla-scale launch --dry-run` and at start with the same words.

This module must stay pure arithmetic on the config: no process group, no
device, no import of a training framework.
"""
from __future__ import annotations

import math

from vla_scale.config.schema import TrainConfig
from vla_scale.errors import ConfigError

AUTO = "auto"
# How many micro-batch sizes an error message proposes (the ones nearest the configured size).
_SUGGESTIONS = 3


def resolve_accumulation(train_cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank per optimizer step for `world_size` ranks; `ConfigError` when they cannot divide."""
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1, got {world_size}")
    g, m, a = train_cfg.global_batch_size, train_cfg.micro_batch_size, train_cfg.gradient_accumulation
    if g <= 0 or m <= 0:
        raise ConfigError("train.global_batch_size and train.micro_batch_size must be positive, "
                          f"got {g} and {m}")
    if a == AUTO:
        if g % (m * world_size) == 0:
            return g // (m * world_size)
        raise ConfigError(f"train.global_batch_size={g} is not divisible by train.micro_batch_size x ranks = "
                          f"{m} x {world_size} = {m * world_size}: it cannot be cut into micro-batches on "
                          f"{world_size} rank(s). {_nearest_valid(g, m, world_size)}")
    if isinstance(a, bool) or not isinstance(a, int) or a < 1:
        raise ConfigError(f"train.gradient_accumulation={a!r}: use 'auto' or a positive integer")
    if m * a * world_size == g:
        return a
    options = [f"train.global_batch_size={m * a * world_size} (keeps accumulation {a})"]
    if g % (a * world_size) == 0:
        options.append(f"train.micro_batch_size={g // (a * world_size)} (keeps accumulation {a})")
    if g % (m * world_size) == 0:
        options.append(f"train.gradient_accumulation=auto (gives {g // (m * world_size)})")
    raise ConfigError(f"train.gradient_accumulation={a} with train.micro_batch_size={m} on {world_size} rank(s) "
                      f"makes a global batch of {m} x {a} x {world_size} = {m * a * world_size}, but "
                      f"train.global_batch_size={g}. Nearest valid settings for {world_size} rank(s): "
                      + "; ".join(options) + ".")


def nearest_global_batch_sizes(global_batch: int, micro_batch: int, world_size: int) -> list[int]:
    """The multiples of micro_batch x world_size nearest to `global_batch`: the one below (if any) and above."""
    step = micro_batch * world_size
    below, above = (global_batch // step) * step, -(-global_batch // step) * step
    return sorted({x for x in (below, above) if x > 0})


def micro_batch_sizes(global_batch: int, world_size: int, near: int, count: int = _SUGGESTIONS) -> list[int]:
    """Up to `count` micro-batch sizes that divide `global_batch` on `world_size` ranks, nearest to `near`
    by ratio (16 is as near to 32 as 64 is), largest first; empty when the ranks cannot share it evenly."""
    if global_batch % world_size:
        return []
    per_rank = global_batch // world_size
    divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    nearest = sorted(divisors, key=lambda d: (abs(math.log(d / near)), -d))[:count]
    return sorted(nearest, reverse=True)


def _nearest_valid(global_batch: int, micro_batch: int, world_size: int) -> str:
    """The settings nearest to (global, micro) that divide on `world_size` ranks, as one sentence."""
    step = micro_batch * world_size
    globals_ = " or ".join(f"{x} (accumulation {x // step})"
                           for x in nearest_global_batch_sizes(global_batch, micro_batch, world_size))
    options = [f"train.global_batch_size={globals_} with this micro-batch"]
    micros = micro_batch_sizes(global_batch, world_size, near=micro_batch)
    if micros:
        per_rank = global_batch // world_size
        options.append("train.micro_batch_size=" + " or ".join(f"{d} (accumulation {per_rank // d})"
                                                              for d in micros) + " with this global batch")
    else:
        shared = " and ".join(str(x) for x in nearest_global_batch_sizes(global_batch, 1, world_size))
        options.append(f"no micro-batch size works with this global batch: {global_batch} samples do not "
                       f"split evenly over {world_size} ranks (the nearest global batch sizes that do: {shared})")
    return f"Nearest valid settings for {world_size} rank(s): " + "; ".join(options) + "."


__all__ = ["AUTO", "micro_batch_sizes", "nearest_global_batch_sizes", "resolve_accumulation"]
