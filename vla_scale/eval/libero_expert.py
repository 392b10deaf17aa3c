"""A scripted pick-and-place expert for the libero_object tasks (goal: one `In`/`On` predicate).

Privileged: it reads the simulator (the goal object's body position, the target region's site or
the target object's body position, and the end effector's position) and returns actions in our
convention ([dx, dy, dz, droll, dpitch, dyaw, gripper], metres, gripper 1 = close), never rotating
the gripper. Phases: move above the object, descend to its body origin (or until the descent stalls
on a tall object), centre over the object at that height, close, lift, carry above the target,
lower, open. Each phase's target is recomputed every step; each phase has a step cap so
a stuck phase moves on instead of stalling the episode.

Which tasks it scripts: the libero_object tasks (pick one grocery item up from the floor and
place it in the basket), in the base suite and its LIBERO-PRO variants; any other task raises
ConfigError. Measured (MuJoCo 3.17.0, physics only, within the 280-step budget): libero_object
28/30 (initial states 0-2 of each task; the flat cream-cheese box fails from states 1 and 2), and
from initial state 0 of each task: libero_object_lan 9/10, libero_object_object 8/10,
libero_object_swap 10/10, libero_object_task 9/10. Its test runs initial states 0-2 of the
alphabet-soup task. An earlier version of the same script solved 0/10 libero_spatial tasks (a
bowl needs a rim grasp), which is why it is limited to libero_object.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vla_scale.errors import ConfigError

if TYPE_CHECKING:
    from vla_scale.eval.libero_backend import LiberoBackend

ABOVE = 0.12  # metres above the object's origin to approach it from
CARRY = 0.20  # metres above the target site/body to carry the object at
RELEASE = 0.10  # metres above the target to open the gripper at
GAIN = 1.5  # command = GAIN x position error (the controller moves about a quarter of it per step)
MAX_CMD = 0.04  # metres per step, inside the backend's 0.05 limit
REACHED = 0.01  # metres: a moving phase ends within this of its target
ALIGNED = 0.003  # metres: centring over the object before closing ends within this
STALL_STEPS, STALL_DROP = 4, 0.001  # the descent has stalled when 4 steps lowered the hand by under 1 mm


class LiberoPickPlaceExpert:
    """Made by `LiberoBackend.expert()` right after a reset; `act()` -> (action, done)."""

    def __init__(self, backend: "LiberoBackend") -> None:
        from vla_scale.eval.libero_backend import _base_of_task

        base = _base_of_task(backend._task or "")
        if base != "libero_object":
            raise ConfigError(f"the libero expert scripts libero_object tasks only (pick and place in the basket); "
                              f"{backend._task!r} is a {base} task")
        env = backend.env.env
        goal = env.parsed_problem["goal_state"]
        if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0].lower() not in ("in", "on"):
            raise ConfigError(f"the libero expert scripts only single In/On goals; task {backend._task!r} "
                              f"has goal {goal}")
        _, obj, target = goal[0]
        if obj not in env.objects_dict:
            raise ConfigError(f"the libero expert cannot pick {obj!r} (not a movable object) in task {backend._task!r}")
        self.backend = backend
        self._sim = env.sim
        self._obj_body = env.obj_body_id[obj]
        if target in env.object_sites_dict:
            self._target = ("site", self._sim.model.site_name2id(target))
        elif target in env.obj_body_id:
            self._target = ("body", env.obj_body_id[target])
        else:
            raise ConfigError(f"the libero expert cannot find the target {target!r} of task {backend._task!r}")
        # (name, gripper command, step cap, hold steps after reaching)
        self._phases = [("above", 0.0, 60), ("descend", 0.0, 40), ("align", 0.0, 12), ("close", 1.0, 12),
                        ("lift", 1.0, 40), ("carry", 1.0, 80), ("lower", 1.0, 30), ("open", 0.0, 10)]
        self._phase = 0
        self._steps = 0
        self._heights: list[float] = []  # end-effector heights during "descend", to detect a stall

    def _object(self) -> np.ndarray:
        return np.array(self._sim.data.body_xpos[self._obj_body])

    def _target_pos(self) -> np.ndarray:
        kind, idx = self._target
        return np.array(self._sim.data.site_xpos[idx] if kind == "site" else self._sim.data.body_xpos[idx])

    def _goal(self, name: str, ee: np.ndarray) -> np.ndarray | None:
        """The phase's end-effector target, or None for a phase that holds position."""
        if name == "above":
            return self._object() + [0, 0, ABOVE]
        if name == "descend":
            return self._object()
        if name == "align":  # centre over the object at the height the descent reached
            return np.array([*self._object()[:2], ee[2]])
        if name == "lift":
            return np.array([ee[0], ee[1], self._target_pos()[2] + CARRY])
        if name == "carry":
            return self._target_pos() + [0, 0, CARRY]
        if name == "lower":
            return self._target_pos() + [0, 0, RELEASE]
        return None

    def act(self) -> tuple[np.ndarray, bool]:
        while self._phase < len(self._phases):
            name, grip, cap = self._phases[self._phase]
            ee = self.backend.eef_pos
            goal = self._goal(name, ee)
            reached = goal is not None and np.linalg.norm(goal - ee) < (ALIGNED if name == "align" else REACHED)
            if name == "descend":
                # A tall object stops the hand above its origin: grasp where the descent stalls.
                self._heights.append(float(ee[2]))
                reached = reached or (len(self._heights) > STALL_STEPS
                                      and self._heights[-STALL_STEPS - 1] - ee[2] < STALL_DROP)
            if self._steps >= cap or reached:
                self._phase, self._steps = self._phase + 1, 0
                continue
            self._steps += 1
            action = np.zeros(7)
            if goal is not None:
                action[:3] = np.clip(GAIN * (goal - ee), -MAX_CMD, MAX_CMD)
            action[6] = grip
            return action, False
        return np.zeros(7), True
