"""Which training strategy a config asks for: `make_strategy(cfg)`.

The factory lives apart from the strategies it chooses between, so the
dependencies run one way only: `strategy.py` (the seam and the single-process
reference) knows no other strategy, `deepspeed_strategy.py` builds on it, and
this module imports both. It imports DeepSpeed only when a config asks for it,
so a single-process run never pays for that import.
"""
from __future__ import annotations

from vla_scale.config.schema import Config
from vla_scale.errors import ConfigError
from vla_scale.train.strategy import SingleProcessStrategy, Strategy


def make_strategy(cfg: Config) -> Strategy:
    """A fresh, not yet set up, strategy for `cfg.train.strategy`."""
    if cfg.train.strategy == "single":
        return SingleProcessStrategy(cfg)
    if cfg.train.strategy == "deepspeed":
        from vla_scale.train.deepspeed_strategy import DeepSpeedStrategy  # imports DeepSpeed: only when asked

        return DeepSpeedStrategy(cfg)
    raise ConfigError(f"train.strategy={cfg.train.strategy!r} is not one of ['single', 'deepspeed']")


__all__ = ["make_strategy"]
