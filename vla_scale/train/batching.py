"""How a global batch is split over ranks: micro-batch x accumulation x world size.

One home for the arithmetic that the DeepSpeed config, `vla-scale plan` and
`vla-scale launch` all need before anything runs: a global batch that the
world cannot divide is reported with the nearest settings that would work,
not found at start-up on the cluster.

This module must never change a batch size on its own: the global batch
defines the optimisation, so a mismatch is an error, not a silent rounding.
"""
from __future__ import annotations

from vla_scale.config.schema import TrainConfig
from vla_scale.errors import ConfigError


def resolve_accumulation(train_cfg: TrainConfig, world_size: int) -> int:
    """Gradient accumulation steps per optimizer step on `world_size` ranks; ConfigError if it cannot divide."""
    if world_size < 1:
        raise ConfigError(f"the world size must be at least 1, got {world_size}")
    g, m = train_cfg.global_batch_size, train_cfg.micro_batch_size
    per_step = m * world_size
    if g % per_step == 0:
        return g // per_step
    lower = (g // per_step) * per_step
    nearest_global = [b for b in (lower, lower + per_step) if b > 0]
    micro = [d for d in range(1, m + 1) if g % (d * world_size) == 0]
    hints = [f"train.global_batch_size={b}" for b in nearest_global]
    if micro:
        hints.append(f"train.micro_batch_size={micro[-1]}")
    raise ConfigError(f"train.global_batch_size={g} cannot be split over {world_size} ranks at "
                      f"train.micro_batch_size={m} (it must be a multiple of {m} x {world_size} = {per_step}); "
                      f"nearest valid settings: {' or '.join(hints)}")
