"""Learning-rate schedule: linear warmup, then cosine decay (or constant).

This module is the one home of the LR multiplier. Every strategy (single
process now, DeepSpeed ZeRO-3 later) builds its scheduler with
`build_scheduler`, so a resumed run and a fresh run see the same LR at the
same step. It must never hold state of its own: the multiplier is a pure
function of the step, and the scheduler is a `LambdaLR` over a
`functools.partial` (picklable; its `state_dict` round-trips), never over a
lambda or closure.

Step convention: `step` is the number of optimizer steps already taken, i.e.
the index of the step about to run (0 for the first step). This is what
`LambdaLR.last_epoch` holds when `scheduler.step()` is called once after each
`optimizer.step()`.

Shape, with W = warmup_steps and T = total_steps:
- warmup, step s < W: (s + 1) / W. Step 0 already trains at 1/W of the peak:
  a zero-LR first step would spend a whole batch of compute for nothing.
  Step W - 1 is the peak (1.0).
- after warmup: "constant" stays at 1.0; "cosine" decays from the peak to
  `min_lr_ratio` along half a cosine that reaches `min_lr_ratio` exactly at
  step T and stays there after (so a run extended past T does not climb back).
  The decay starts at the peak step, so the curve is continuous: no two steps
  sit at the peak and there is no jump between warmup and decay.
"""
from __future__ import annotations

import functools
import math

import torch

from vla_scale.errors import ConfigError

SCHEDULES = ("cosine", "constant")


def lr_lambda(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based)."""
    _check(warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule, min_lr_ratio=min_lr_ratio)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    # The peak is the last warmup step (or step 0 without warmup); the cosine
    # runs from there to total_steps.
    peak = max(warmup_steps - 1, 0)
    span = total_steps - peak
    if span <= 0:
        return min_lr_ratio
    progress = min((step - peak) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` applying `lr_lambda`; call `.step()` once after each optimizer step.

    Resume with `scheduler.load_state_dict(saved)` on a scheduler built with
    the same arguments: the multiplier is recomputed from the restored step.
    """
    _check(warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule, min_lr_ratio=min_lr_ratio)
    fn = functools.partial(
        lr_lambda,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _check(*, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if total_steps <= 0:
        raise ConfigError(f"train.steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"train.warmup_steps={warmup_steps} must be in 0..train.steps={total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
