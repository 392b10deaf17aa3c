"""The built-in tabletop's task instance for a (task, seed), independent of any simulator.

Colours, pad and cube placements, cube yaws, the goal and the instruction are
drawn from one numpy Generator seeded by the episode seed, in exactly the
order `MujocoBackend.reset` draws them, so every backend that builds the
tabletop from a `Layout` (the Isaac Gym backend does) starts the same
(task, seed) with the same scene and the same instruction as the MuJoCo
backend. `tests/test_eval_isaacgym.py` checks the two against each other.

This module must never import a simulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vla_scale.eval.backend import Pad
from vla_scale.eval.mujoco_backend import (MIN_OBJECT_GAP, MIN_PAD_GAP, N_OBJECTS, N_PADS, OBJECT_COLOURS,
                                           OBJECT_HALF, PAD_COLOURS, PAD_HALF, _sample_apart)
from vla_scale.eval.tasks import get_task


@dataclass(frozen=True)
class Layout:
    """One task instance of the tabletop: what goes where, what to do, and how it is said."""
    task: str
    object_colours: tuple[str, ...]  # object i's colour name, which is also its name in SceneView
    pad_colours: tuple[str, ...]
    object_xy: np.ndarray  # (N_OBJECTS, 2) cube centres on the table, metres
    object_yaw: np.ndarray  # (N_OBJECTS,) radians about z
    pad_xy: np.ndarray  # (N_PADS, 2) pad centres, metres
    goal: dict[str, str]
    instruction: str

    def pads(self) -> dict[str, Pad]:
        return {c: Pad(c, np.array(xy), PAD_HALF) for c, xy in zip(self.pad_colours, self.pad_xy)}


def sample_layout(task: str, seed: int) -> Layout:
    """The task instance of (task, seed); an unknown task is a ConfigError."""
    spec = get_task(task)
    rng = np.random.default_rng(seed)
    obj_colours = [list(OBJECT_COLOURS)[i] for i in rng.choice(len(OBJECT_COLOURS), N_OBJECTS, replace=False)]
    pad_colours = [list(PAD_COLOURS)[i] for i in rng.choice(len(PAD_COLOURS), N_PADS, replace=False)]
    pad_xy = _sample_apart(rng, N_PADS, MIN_PAD_GAP, [], "pads")
    obj_xy = _sample_apart(rng, N_OBJECTS, MIN_OBJECT_GAP,
                           [(c, PAD_HALF * np.sqrt(2) + OBJECT_HALF * 2) for c in pad_xy], "cubes")
    obj_yaw = rng.uniform(-np.pi / 4, np.pi / 4, N_OBJECTS)
    goal = spec.sample_goal(rng, obj_colours, pad_colours)
    instruction = spec.instruction(goal, rng)
    return Layout(spec.name, tuple(obj_colours), tuple(pad_colours), np.array(obj_xy), np.array(obj_yaw),
                  np.array(pad_xy), goal, instruction)

