"""The simulator-independent interface every evaluation backend implements.

A backend resets to a task instance chosen by a seed and a perturbation
variant, takes 7-D actions, and returns observations: camera images by
name, the language instruction and a proprioceptive state vector. The
rollout runner, experts and policies see only this interface, `Episode`
(what to run) and `SceneView` (object and pad geometry, for success
predicates and scripted experts).

Suites and plans: every backend names its suites (`suites()`: suite name ->
the perturbation variants it averages over) and turns (suite, tasks,
episodes, seed) into a list of `Episode`s (`plan()`), without creating a
simulator, so the runner can plan in the parent process and send episodes
to worker processes. An `Episode` is plain, picklable data; the same
Episode on the same backend gives the same scene, instruction and pixels.

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
from typing import ClassVar, Protocol, Sequence

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


def check_action(action: np.ndarray) -> np.ndarray:
    """One action as 7 finite float64 numbers, or a ConfigError showing what was given."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (ACTION_DIM,) or not np.all(np.isfinite(a)):
        raise ConfigError(f"an action must be 7 finite numbers [dx, dy, dz, droll, dpitch, dyaw, gripper], "
                          f"got {np.asarray(action).tolist()}")
    return a


UNPERTURBED = "none"  # the variant name of the unperturbed task


@dataclass(frozen=True)
class Episode:
    """One evaluation episode, as plain picklable data: the backend's task name, the perturbation
    variant (UNPERTURBED for none), the seed that fixes the scene, and the step budget."""
    task: str
    variant: str
    seed: int
    max_steps: int
    index: int = 0  # the episode's number within its (task, variant) cell: 0, 1, ...

    @property
    def key(self) -> str:
        return f"{self.task}/{self.variant}/{self.index}"


class Expert(Protocol):
    """A scripted policy with privileged access to its backend's state, made per episode."""

    def act(self) -> tuple[np.ndarray, bool]:
        """The next 7-D action, and whether the expert has finished (then the action is not applied)."""
        ...


class Backend(abc.ABC):
    """One simulated environment. Not thread-safe; one episode at a time."""

    name: ClassVar[str] = "backend"
    # False when the simulator cannot share a process with the policy (Isaac Gym must be imported before
    # torch): the runner then uses a spawned worker even for one environment.
    in_process_ok: ClassVar[bool] = True

    @classmethod
    @abc.abstractmethod
    def suites(cls) -> dict[str, tuple[str, ...]]:
        """Suite name -> the perturbation variants it runs (a suite's score is the mean over its variants)."""

    @classmethod
    @abc.abstractmethod
    def tasks(cls, suite: str) -> tuple[str, ...]:
        """The task names a suite runs by default (`plan(tasks=None)`)."""

    @classmethod
    def plan(cls, suite: str, tasks: Sequence[str] | None, episodes: int, seed: int) -> list[Episode]:
        """The episodes of `suite`: for each variant, each task, `episodes` seeds (seed, seed+1, ...).
        Backends whose episodes are not indexed by a free seed (LIBERO's fixed initial states) override it."""
        suites = cls.suites()
        if suite not in suites:
            raise ConfigError(f"unknown {cls.name} suite {suite!r}; suites: {', '.join(suites)}")
        if episodes < 1:
            raise ConfigError(f"episodes must be at least 1, got {episodes}")
        names = tuple(tasks) if tasks else cls.tasks(suite)
        known = cls.tasks(suite)
        bad = [t for t in names if t not in known]
        if bad:
            raise ConfigError(f"unknown {cls.name} task(s) {bad} for suite {suite!r}; tasks: {', '.join(known)}")
        return [Episode(task, variant, seed + i, cls.episode_length(task), i)
                for variant in suites[suite] for task in names for i in range(episodes)]

    @classmethod
    def episode_length(cls, task: str) -> int:
        """Control steps an episode of `task` may take (used by the default `plan`)."""
        raise NotImplementedError(f"{cls.__name__} must define episode_length or override plan")

    @abc.abstractmethod
    def reset(self, task: str, seed: int, perturbation: str | None = None) -> Observation:
        """Start an episode of `task` under the perturbation variant `perturbation` (None or UNPERTURBED:
        none); the same (task, seed, perturbation) gives the same scene, instruction and pixels."""

    def reset_episode(self, episode: Episode) -> Observation:
        return self.reset(episode.task, episode.seed, episode.variant)

    def expert(self) -> Expert:
        """A fresh scripted expert for the episode just reset (privileged: reads the simulator's state)."""
        raise ConfigError(f"the {self.name} backend has no scripted expert")

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
