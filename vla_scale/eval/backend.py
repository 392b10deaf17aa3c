"""The simulator-independent interface every evaluation backend implements.

A backend resets to a task instance chosen by a seed (and, later, a
perturbation), takes 7-D actions, and returns observations: camera images
by name, the language instruction and a proprioceptive state vector. The
rollout code, experts and policies see only this interface and `SceneView`
(object and pad geometry, for success predicates and scripted experts).

Action convention (the one the model trains on, see
`vla_scale.data.synthetic`): [dx, dy, dz, droll, dpitch, dyaw, gripper],
translations in metres and rotations in radians per control step, applied
as deltas to the end effector's target pose; gripper 1 closes, 0 opens.
Each backend documents its own per-step limits and clips to them.

This module must never import a simulator.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_scale.errors import ConfigError

ACTION_DIM = 7
GRIPPER_CLOSED = 1.0
GRIPPER_OPEN = 0.0


@dataclass
class Observation:
    """What a policy sees after a reset or a step."""
    images: dict[str, np.ndarray]  # camera name -> uint8 (H, W, 3); empty when rendering is off
    instruction: str
    state: np.ndarray  # float32 proprioception: end-effector position (3), quaternion wxyz (4), gripper (1)


@dataclass(frozen=True)
class Pad:
    """A flat target area on the table (axis-aligned square)."""
    name: str
    center: np.ndarray  # (x, y) in metres
    half: float


@dataclass
class SceneView:
    """The geometry a success predicate or scripted expert may read (privileged: never given to a policy)."""
    objects: dict[str, np.ndarray]  # object name -> centre (x, y, z), metres
    object_half: float  # every object is a cube of this half side
    pads: dict[str, Pad]
    table_z: float  # height of the table surface
    held: str | None  # name of the object held by the gripper, if any
    ee_pos: np.ndarray
    ee_yaw: float
    gripper_closed: bool
    goal: dict[str, str] = field(default_factory=dict)  # task slots, e.g. {"object": "red", "target": "white"}


def check_perturbation(perturbation: Any) -> None:
    """Perturbation suites are not implemented yet: anything but None is refused, not silently ignored."""
    if perturbation is not None:
        raise ConfigError(f"perturbation {perturbation!r} is not supported yet: only perturbation=None "
                          f"(the unperturbed task) can be evaluated")


class Backend(abc.ABC):
    """One simulated environment. Not thread-safe; one episode at a time."""

    @abc.abstractmethod
    def reset(self, task: str, seed: int, perturbation: Any = None) -> Observation:
        """Start an episode of `task`; the same (task, seed) gives the same scene and instruction."""

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> Observation:
        """Apply one 7-D action (clipped to the backend's limits) and advance one control step."""

    @abc.abstractmethod
    def success(self) -> bool:
        """Whether the current episode's task is accomplished now."""

    @abc.abstractmethod
    def scene(self) -> SceneView:
        """The current privileged geometry (for experts and success predicates)."""

    def close(self) -> None:
        """Release renderers and other resources."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
