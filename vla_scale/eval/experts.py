"""Scripted experts for the built-in tasks, and writing their demonstrations as robot shards.

An expert reads the privileged `SceneView` (object centres, pads, what is
held) and returns the next 7-D action in the convention the model trains on
([dx, dy, dz, droll, dpitch, dyaw, gripper], gripper 1 = closed), each delta
within the MuJoCo backend's per-step limits. Each expert is a short list of
phases (move above, descend, close, lift, carry, ...) whose targets are
recomputed from the current scene every step, so a cube that slid a little
is still reached.

Experts exist to produce demonstrations and to prove every task solvable;
they must never be used as a policy under evaluation, and nothing here
writes anything but complete shard folders (ShardWriter's atomic close).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from vla_scale.data.schema import robot_sample
from vla_scale.data.writer import ShardWriter
from vla_scale.errors import ConfigError
from vla_scale.eval.backend import ACTION_DIM, Backend, SceneView
from vla_scale.eval.tasks import get_task

MAX_STEP = 0.018  # metres per step: just inside the backend's 0.02 limit
CARRY_Z = 0.12  # grasp-point height for moving above other cubes (they are 4 cm tall)
NEAR_GAP = 0.062  # centre to centre: two yawed cubes (corners 28 mm out) never touch, well under NEAR_DISTANCE
REACHED = 0.002  # metres: a phase's target counts as reached within this
# Horizontal and vertical tolerance of the phases that hand over to closing on a cube and opening over its
# place: half the weld grasp's own tolerance (GRASP_XY 2 cm, GRASP_Z 1.5 cm in the MuJoCo backend), well inside
# a pad's 5 cm half side and a stack's 2 cm alignment. Within it horizontally the cone (`_funnel`) aims at the
# point itself. The cone phase before it still ends within REACHED, so a clean expert closes at the point;
# the tolerance matters where the point moved after that (a cube nudged by the fingers), which then closes
# where it is rather than chasing the last millimetres.
GRASP_REACH = (0.008, 0.006)
# The approach cone (`_funnel`): height over the target per metre of horizontal distance, plus a margin. At
# 2.0 the open fingertips (15 mm under the grasp point) clear a cube's top until the cube is between them;
# every pick task's expert succeeded in 40/40 episodes with it (as with the two-leg path before it).
FUNNEL_SLOPE = 2.0
FUNNEL_RISE = 0.01
# Steps to stand still after closing and after opening the gripper. One is enough for the weld grasp (the
# cube is fixed to the gripper when the command closes), and a policy that sees one frame was seen to
# close in mid-air and then stand still for good: standing still with the gripper closed is what it had
# seen five times per demonstration, and a zero-motion action is a fixed point (the next frame is the
# same, so is the next action). move_near keeps five: with one, fingers still opening as the gripper
# lifts knocked the neighbouring cube in 5/60 episodes.
HOLD = {"move_near": 5}
# Phase: (view -> target end-effector position, gripper command, steps to hold after reaching the target,
# reached: None for within REACHED of the target, or (horizontal, vertical) tolerances)
Phase = tuple[Callable[[SceneView], np.ndarray], float, int, "tuple[float, float] | None"]


def _above(xy: np.ndarray, z: float) -> np.ndarray:
    return np.array([xy[0], xy[1], z])


def _funnel(point: Callable[[SceneView], np.ndarray], reach: float = REACHED) -> Callable[[SceneView], np.ndarray]:
    """A target that leads the gripper down a cone onto `point(view)`: right above the point at any
    horizontal distance e, at FUNNEL_RISE + FUNNEL_SLOPE * e over it (capped at CARRY_Z), so the gripper
    closes in sideways and downwards at once and only the last millimetres are straight down.

    A path of two legs (over the point at the carrying height, then straight down) asks a policy that
    sees one frame to decide when it is exactly over the point, and one that decided too early went
    down beside the cube and closed on nothing. On the cone every action is a smooth function of
    where the point is relative to the gripper, and a gripper off to the side is led up and across.
    Within `reach` horizontally the target is the point itself."""
    def target(v: SceneView) -> np.ndarray:
        p = point(v)
        e = float(np.linalg.norm(p[:2] - v.ee_pos[:2]))
        if e <= reach:
            return p
        return _above(p[:2], p[2] + min(CARRY_Z - p[2], FUNNEL_RISE + FUNNEL_SLOPE * e))
    return target


def _pick_then_place(place_xyz: Callable[[SceneView], np.ndarray], hold: int) -> list[Phase]:
    """Grasp the goal object and release it with its centre at `place_xyz(view)`, standing still for `hold`
    steps after closing and after opening the gripper."""
    obj = lambda v: v.objects[v.goal["object"]]  # noqa: E731
    release = lambda v: place_xyz(v) + [0, 0, 0.004]  # noqa: E731
    return [
        # down the cone onto the cube (straight at it within GRASP_REACH across); then to its centre, handing
        # over to closing within GRASP_REACH of it
        (_funnel(lambda v: obj(v).copy(), GRASP_REACH[0]), 0.0, 0, None),
        (lambda v: obj(v).copy(), 0.0, 0, GRASP_REACH),
        (lambda v: v.ee_pos.copy(), 1.0, hold, None),
        (lambda v: _above(v.ee_pos[:2], CARRY_Z), 1.0, 0, None),
        (_funnel(release, GRASP_REACH[0]), 1.0, 0, None),
        # released 4 mm up (within GRASP_REACH): it drops onto its support (after standing still for two
        # steps where hold > 1)
        (release, 1.0, 2 if hold > 1 else 0, GRASP_REACH),
        (lambda v: v.ee_pos.copy(), 0.0, hold, None),
        (lambda v: _above(v.ee_pos[:2], CARRY_Z), 0.0, 0, None),
    ]


def _pad_place(v: SceneView) -> np.ndarray:
    return _above(v.pads[v.goal["target"]].center, v.table_z + v.object_half)


def _stack_place(v: SceneView) -> np.ndarray:
    base = v.objects[v.goal["target"]]
    return _above(base[:2], base[2] + 2 * v.object_half)


def _near_place(v: SceneView) -> np.ndarray:
    """Beside the target cube along the gripper's x axis (the side away from other cubes and the edge).

    Only along x: the open fingers reach 52 mm from the centre along y, so a cube set down beside
    its neighbour along y would have the fingers knock the neighbour away when they open."""
    other = v.objects[v.goal["target"]][:2]
    best, best_clear = None, -1.0
    for sign in (1.0, -1.0):
        p = other + np.array([sign * NEAR_GAP, 0.0])
        clear = min([np.linalg.norm(p - q[:2]) for n, q in v.objects.items() if n != v.goal["object"]]
                    + [0.3 - np.max(np.abs(p))])  # keep away from the edge of the reachable area
        if clear > best_clear:
            best, best_clear = p, clear
    return _above(best, v.table_z + v.object_half)


class PushExpert:
    """Closed fingers as a pusher, steered every step along the line from the cube to the pad centre."""

    BEHIND = 0.045  # start of the push: half a (yawed) cube plus the closed fingers' half width plus a gap
    # While pushing, the grasp point aims this far behind the cube centre plus one step ahead: about the
    # contact distance (20-28 mm half cube plus 10 mm of finger). Aiming deeper (28 mm) rammed the cube
    # and spun it off the line (27/100 episodes succeeded); 45 mm pushed too little near the pad.
    CONTACT = 0.04
    DONE = 0.02  # stop with the cube centre this close to the pad centre (the pad's half side is 50 mm)

    def __init__(self) -> None:
        self.phase = 0
        self.direction: np.ndarray | None = None

    def act(self, v: SceneView) -> tuple[np.ndarray, bool]:
        obj = v.objects[v.goal["object"]]
        goal = v.pads[v.goal["target"]].center
        to_goal = goal - obj[:2]
        dist = float(np.linalg.norm(to_goal))
        d = to_goal / max(dist, 1e-9)
        low = v.table_z + v.object_half
        if self.phase == 0:  # above the start of the push line
            self.direction = d
            target = _above(obj[:2] - d * (self.BEHIND + 0.02), CARRY_Z)
        elif self.phase == 1:
            target = _above(obj[:2] - self.direction * (self.BEHIND + 0.02), low)
        elif self.phase == 2:  # push: aim the contact point at the cube, the cube at the pad centre
            if dist < self.DONE:
                self.phase = 3
                return self.act(v)
            target = _above(obj[:2] - d * self.CONTACT + d * min(dist, MAX_STEP), low)
            return _toward(v, target, 1.0), False
        elif self.phase == 3:  # back off before lifting, so the fingers do not drag the cube
            target = _above(obj[:2] - d * (self.BEHIND + 0.03), low)
        else:
            target = _above(v.ee_pos[:2], CARRY_Z)
        if np.linalg.norm(target - v.ee_pos) < REACHED:
            self.phase += 1
            if self.phase > 4:
                return np.array([0, 0, 0, 0, 0, 0, 1.0]), True
        return _toward(v, target, 1.0), False


def _toward(v: SceneView, target: np.ndarray, gripper: float) -> np.ndarray:
    delta = target - v.ee_pos
    n = float(np.linalg.norm(delta))
    if n > MAX_STEP:
        delta = delta * (MAX_STEP / n)
    return np.concatenate([delta, [0.0, 0.0, 0.0, gripper]])


class PhaseExpert:
    def __init__(self, phases: list[Phase]) -> None:
        self.phases, self.phase, self.held_for, self.target = phases, 0, 0, None

    def act(self, v: SceneView) -> tuple[np.ndarray, bool]:
        """(action, done): done once the last phase has been reached and held."""
        if self.phase >= len(self.phases):
            return np.zeros(ACTION_DIM), True
        fn, gripper, hold, reach = self.phases[self.phase]
        if self.target is None or hold == 0:
            # Holding phases freeze their target when they start ("stay here"); moving phases follow the scene.
            self.target = fn(v)
        off = self.target - v.ee_pos
        if (np.linalg.norm(off) < REACHED if reach is None else
                np.linalg.norm(off[:2]) <= reach[0] and abs(off[2]) <= reach[1]):
            if self.held_for >= hold:
                self.phase, self.held_for, self.target = self.phase + 1, 0, None
                return self.act(v)
            self.held_for += 1
        return _toward(v, self.target, gripper), False


def make_expert(task: str) -> Any:
    """A fresh expert for one episode of `task` (an object with act(view) -> (action, done))."""
    get_task(task)  # unknown names are a ConfigError
    if task == "push":
        return PushExpert()
    place = {"pick_place": _pad_place, "move_near": _near_place, "stack": _stack_place}[task]
    return PhaseExpert(_pick_then_place(place, HOLD.get(task, 1)))


class SceneExpert:
    """The `Backend.expert()` of backends that expose `scene()`: the task's expert, reading the scene."""

    def __init__(self, backend: Backend, task: str) -> None:
        self.backend, self.inner = backend, make_expert(task)

    def act(self) -> tuple[np.ndarray, bool]:
        return self.inner.act(self.backend.scene())


def check_noise(noise: float) -> None:
    """ConfigError unless `noise` is a usable DART standard deviation (metres, finite, >= 0)."""
    if not (np.isfinite(noise) and noise >= 0):
        raise ConfigError(f"noise must be a finite standard deviation >= 0 in metres, got {noise}")


def run_expert(backend: Backend, task: str, seed: int, on_step: Callable[[Any, np.ndarray, int], None] | None = None,
               *, variant: str | None = None, noise: float = 0.0, until_success: bool = False) -> bool:
    """One expert episode under the perturbation `variant` (None: unperturbed); `on_step(observation, action,
    step)` sees each observation before its action. Returns whether the task succeeded when the expert
    finished (or the episode length ran out).

    `noise` > 0: DART-style noise injection (Laskey et al., 2017). While the expert is travelling (its
    step is at least half the step limit), the move it executes gets Gaussian noise of this standard
    deviation (metres, per axis); `on_step` still sees the expert's own action. The demonstrations then
    visit states a little off the expert's path and show the way back to it, which is what a cloned policy
    needs once its own small errors take it there. Fine alignment (grasp, release) is never perturbed.
    The noise is drawn from a generator seeded by the episode seed: the same call gives the same episode.

    `until_success`: end the episode at the first step after which the task holds (as evaluation episodes
    end, LIBERO's and SimplerEnv's rule), so no demonstration shows what comes after (lifting away from a
    placed cube looks like the descent to it, and a one-frame policy cannot tell the two apart)."""
    check_noise(noise)
    obs = backend.reset(task, seed, variant)
    expert = make_expert(task)
    rng = np.random.default_rng([seed, 0xDA27])
    for t in range(get_task(task).episode_length):
        action, done = expert.act(backend.scene())
        if done:
            break
        if on_step is not None:
            on_step(obs, action, t)
        executed = action
        if noise > 0 and np.linalg.norm(action[:3]) >= MAX_STEP / 2:
            executed = action.copy()
            executed[:3] += rng.normal(0.0, noise, 3)
        obs = backend.step(executed)
        if until_success and backend.success():
            break
    return backend.success()


def write_demonstrations(out_dir: str | Path, task: str, episodes: int, seed: int, *, image_size: int = 128,
                         overwrite: bool = False) -> dict[str, Any]:
    """Run the expert for `episodes` episodes (seeds seed, seed+1, ...) and write every step of each
    successful one as a robot sample (primary camera image, instruction, 7-D action, state). Episode
    indices count the written episodes (0, 1, ...); a failed episode is skipped, and its seed named in
    the summary's skip examples. Returns ShardWriter's summary (also saved beside the shards)."""
    from vla_scale.eval.mujoco_backend import MujocoBackend

    dataset = f"mujoco_{task}"
    with MujocoBackend(cameras=("primary",), image_size=image_size) as backend, \
            ShardWriter(out_dir, overwrite=overwrite, metadata={"source": dataset, "seed": seed}) as writer:
        written = 0
        for e in range(episodes):
            rows: list[dict[str, Any]] = []

            def keep(obs, action, t, e=written):
                rows.append(robot_sample(image=obs.images["primary"], instruction=obs.instruction,
                                         action=action.astype(np.float32), state=obs.state, dataset=dataset,
                                         episode=e, step=t, where=f"{dataset} seed {seed + e} step {t}"))

            if run_expert(backend, task, seed + e, keep):
                for row in rows:
                    writer.write(row)
                written += 1
            else:
                writer.skip("expert_failed", f"{dataset}: the expert failed on seed {seed + e}", samples=len(rows),
                            episodes=1)
    return writer.summary
