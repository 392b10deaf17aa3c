"""The built-in MuJoCo tabletop: a table, four coloured cubes, two coloured pads
and a floating two-finger gripper, needing nothing beyond the `mujoco` package.

The gripper is a mocap body: each action moves its target pose by the
(clipped) delta, so the end effector follows exactly, without an arm. Its two
fingers are slide joints driven by position actuators and collide with the
cubes (they push, and squeeze what they hold).

Simplification, stated plainly: grasping is a weld-on-contact grasp, not
friction. When the gripper command switches from open to closed with a cube's
centre between the fingertips, a weld constraint fixes that cube to the
gripper at its current relative pose; opening the gripper removes the weld.
Real friction grasps with a mocap hand were not made robust in the time
available; policies trained here learn when to close and open, not how hard.

Rendering is offscreen (set MUJOCO_GL=egl on a headless Linux machine before
`mujoco` is imported; llvmpipe is enough). Shadows are off: on the software
renderer they cost about 20x per frame. Never fork a process after a
renderer exists (GL contexts hang across fork): use spawn for parallel
environments. All randomness (colours, placements, goal, instruction)
comes from one numpy Generator seeded by `reset`'s seed, so a (task, seed)
pair always gives the same scene and the same pixels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vla_scale.errors import ConfigError
from vla_scale.eval.backend import ACTION_DIM, UNPERTURBED, Backend, Expert, Observation, Pad, SceneView
from vla_scale.eval.perturbations import SUITES, check_variant
from vla_scale.eval.tasks import NEAR_DISTANCE, TASKS, Task, get_task

MAX_TRANSLATION = 0.02  # metres per control step (1 m/s at 50 Hz)
MAX_ROTATION = 0.1  # radians per control step, per axis
CONTROL_DT = 0.02  # seconds per control step
PHYSICS_DT = 0.002
OBJECT_HALF = 0.02  # cubes of 4 cm
PAD_HALF = 0.05
N_OBJECTS = 4
N_PADS = 2
TABLE_Z = 0.0
HOME = np.array([0.0, 0.0, 0.2])
# The gripper's target is kept inside this box so no action can drive it through the table
# (its fingertips reach 15 mm below the grasp point) or far out of the cameras' view.
EE_LOW = np.array([-0.3, -0.3, TABLE_Z + 0.018])
EE_HIGH = np.array([0.3, 0.3, 0.35])
FINGER_OPEN = 0.04  # finger slide position when open (inner face 4 cm from the centre line)
GRASP_XY = 0.02  # a cube is graspable when its centre is this close to the grasp point...
GRASP_Z = 0.015  # ...horizontally and vertically

OBJECT_COLOURS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.15), "blue": (0.1, 0.25, 0.9),
                  "yellow": (0.95, 0.85, 0.1), "purple": (0.55, 0.15, 0.7), "orange": (1.0, 0.5, 0.05)}
PAD_COLOURS = {"white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08), "grey": (0.5, 0.5, 0.5)}
# Placement area for cubes and pads, and the minimum distances between them: far enough that no task
# starts solved (cubes never start on a pad or near each other) and the gripper fits between cubes.
AREA_LOW, AREA_HIGH = np.array([-0.15, -0.2]), np.array([0.15, 0.2])
MIN_OBJECT_GAP = NEAR_DISTANCE + 0.03
MIN_PAD_GAP = 2 * PAD_HALF + 0.04


def _load_triton_before_gl() -> None:
    """Import triton, if installed, before the first GL context exists.

    On the software renderer (Mesa llvmpipe) a GL context loads Mesa's LLVM; importing triton (which
    bundles its own LLVM, and which transformers and streaming import) after that segfaults the
    process. Loaded in the other order, both work and the pixels are the same."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


def _scene_xml(image_size: int) -> str:
    objects = "\n".join(
        f'<body name="obj{i}" pos="0 0 {TABLE_Z + OBJECT_HALF}"><freejoint name="obj{i}"/>'
        f'<geom name="obj{i}" type="box" size="{OBJECT_HALF} {OBJECT_HALF} {OBJECT_HALF}" '
        f'friction="1 0.01 0.001" rgba="1 1 1 1"/></body>' for i in range(N_OBJECTS))
    pads = "\n".join(
        f'<geom name="pad{i}" type="box" size="{PAD_HALF} {PAD_HALF} 0.001" pos="0 0 {TABLE_Z + 0.001}" '
        f'contype="0" conaffinity="0" rgba="1 1 1 1"/>' for i in range(N_PADS))
    # Stiff welds (solref 4 ms): with the default 20 ms a carried cube lagged 2 cm behind the fingers and
    # was flung away when released (2 of 20 pick-and-place episodes succeeded).
    welds = "\n".join(f'<weld name="grasp{i}" body1="ee" body2="obj{i}" active="false" solref="0.004 1"/>'
                      for i in range(N_OBJECTS))
    return f"""
<mujoco model="vla_scale_tabletop">
  <option timestep="{PHYSICS_DT}" gravity="0 0 -9.81"/>
  <visual><global offwidth="{max(image_size, 640)}" offheight="{max(image_size, 480)}"/>
    <quality shadowsize="0"/></visual>
  <worldbody>
    <light name="sun" pos="0 0 1.5" dir="0 0 -1" directional="true" castshadow="false" diffuse="0.8 0.8 0.8"/>
    <geom name="table" type="box" size="0.4 0.4 0.02" pos="0 0 {TABLE_Z - 0.02}" rgba="0.55 0.4 0.28 1"/>
    {pads}
    <camera name="primary" pos="0.45 0 0.45" xyaxes="0 1 0 -0.707 0 0.707" fovy="50"/>
    <body name="ee" mocap="true" pos="{HOME[0]} {HOME[1]} {HOME[2]}">
      <geom name="palm" type="box" size="0.012 0.055 0.01" pos="0 0 0.055" rgba="0.3 0.3 0.35 1"/>
      <camera name="wrist" pos="0.025 0 0.045" xyaxes="0 -1 0 1 0 0" fovy="75"/>
      <body name="finger_l"><joint name="finger_l" type="slide" axis="0 1 0" range="0 {FINGER_OPEN}" damping="5"/>
        <geom type="box" size="0.01 0.006 0.035" pos="0 0.006 0.02" mass="0.05" rgba="0.2 0.2 0.25 1"/></body>
      <body name="finger_r"><joint name="finger_r" type="slide" axis="0 -1 0" range="0 {FINGER_OPEN}" damping="5"/>
        <geom type="box" size="0.01 0.006 0.035" pos="0 -0.006 0.02" mass="0.05" rgba="0.2 0.2 0.25 1"/></body>
    </body>
    {objects}
  </worldbody>
  <equality>{welds}</equality>
  <actuator>
    <position name="finger_l" joint="finger_l" kp="200" ctrlrange="0 {FINGER_OPEN}"/>
    <position name="finger_r" joint="finger_r" kp="200" ctrlrange="0 {FINGER_OPEN}"/>
  </actuator>
</mujoco>"""


def _quat_from_rpy(rpy: np.ndarray) -> np.ndarray:
    """wxyz quaternion of extrinsic x-y-z rotations (roll, pitch, yaw)."""
    r, p, y = rpy / 2
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.array([cr * cp * cy + sr * sp * sy, sr * cp * cy - cr * sp * sy,
                     cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy])


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def _yaw(q: np.ndarray) -> float:
    w, x, y, z = q
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def _sample_apart(rng: np.random.Generator, n: int, gap: float, avoid: Sequence[tuple[np.ndarray, float]],
                  what: str) -> list[np.ndarray]:
    points: list[np.ndarray] = []
    for _ in range(10_000):
        p = rng.uniform(AREA_LOW, AREA_HIGH)
        if all(np.linalg.norm(p - q) >= gap for q in points) and all(np.linalg.norm(p - c) >= r for c, r in avoid):
            points.append(p)
            if len(points) == n:
                return points
    # A bug in the layout constants, not a user error.
    raise RuntimeError(f"could not place {n} {what} apart in the table area")


class MujocoBackend(Backend):
    """The tabletop scene. `cameras=()` turns rendering off (physics only, for fast expert checks)."""

    name = "mujoco"

    @classmethod
    def suites(cls) -> dict[str, tuple[str, ...]]:
        return dict(SUITES)

    @classmethod
    def tasks(cls, suite: str) -> tuple[str, ...]:
        return tuple(TASKS)

    @classmethod
    def episode_length(cls, task: str) -> int:
        return get_task(task).episode_length

    def __init__(self, *, cameras: Sequence[str] = ("primary",), image_size: int = 128) -> None:
        import mujoco

        unknown = set(cameras) - {"primary", "wrist"}
        if unknown:
            raise ConfigError(f"unknown camera(s) {sorted(unknown)}; the MuJoCo tabletop has 'primary' and 'wrist'")
        if image_size not in (128, 224):
            raise ConfigError(f"image_size must be 128 or 224 (the sizes the encoders take), got {image_size}")
        self._mj = mujoco
        self.model = mujoco.MjModel.from_xml_string(_scene_xml(image_size))
        self.model.light_castshadow[:] = 0  # see the module docstring: shadows dominate software render time
        self.data = mujoco.MjData(self.model)
        self.cameras = tuple(cameras)
        self.image_size = image_size
        self._renderer = None
        if self.cameras:
            _load_triton_before_gl()
            self._renderer = mujoco.Renderer(self.model, image_size, image_size)
        self._substeps = round(CONTROL_DT / PHYSICS_DT)
        name = lambda kind, n: mujoco.mj_name2id(self.model, kind, n)  # noqa: E731
        self._obj_qpos = [self.model.jnt_qposadr[name(mujoco.mjtObj.mjOBJ_JOINT, f"obj{i}")] for i in range(N_OBJECTS)]
        self._obj_body = [name(mujoco.mjtObj.mjOBJ_BODY, f"obj{i}") for i in range(N_OBJECTS)]
        self._obj_geom = [name(mujoco.mjtObj.mjOBJ_GEOM, f"obj{i}") for i in range(N_OBJECTS)]
        self._pad_geom = [name(mujoco.mjtObj.mjOBJ_GEOM, f"pad{i}") for i in range(N_PADS)]
        self._weld = [name(mujoco.mjtObj.mjOBJ_EQUALITY, f"grasp{i}") for i in range(N_OBJECTS)]
        self._ee_body = name(mujoco.mjtObj.mjOBJ_BODY, "ee")
        self._fingers = [self.model.jnt_qposadr[name(mujoco.mjtObj.mjOBJ_JOINT, f)] for f in ("finger_l", "finger_r")]
        self._task: Task | None = None
        self._goal: dict[str, str] = {}
        self._instruction = ""
        self._object_names: list[str] = []
        self._pads: dict[str, Pad] = {}
        self._held: int | None = None
        self._closed = False

    # -- episode ---------------------------------------------------------------------------
    def reset(self, task: str, seed: int, perturbation: str | None = None) -> Observation:
        variant = check_variant(perturbation)
        if variant != UNPERTURBED:
            raise ConfigError(f"perturbation variant {variant!r} is not implemented yet")
        spec = get_task(task)
        mj, m, d = self._mj, self.model, self.data
        rng = np.random.default_rng(seed)
        obj_colours = [list(OBJECT_COLOURS)[i] for i in rng.choice(len(OBJECT_COLOURS), N_OBJECTS, replace=False)]
        pad_colours = [list(PAD_COLOURS)[i] for i in rng.choice(len(PAD_COLOURS), N_PADS, replace=False)]
        pad_xy = _sample_apart(rng, N_PADS, MIN_PAD_GAP, [], "pads")
        obj_xy = _sample_apart(rng, N_OBJECTS, MIN_OBJECT_GAP, [(c, PAD_HALF * np.sqrt(2) + OBJECT_HALF * 2)
                                                                 for c in pad_xy], "cubes")
        obj_yaw = rng.uniform(-np.pi / 4, np.pi / 4, N_OBJECTS)
        self._goal = spec.sample_goal(rng, obj_colours, pad_colours)
        self._instruction = spec.instruction(self._goal, rng)

        mj.mj_resetData(m, d)
        for i, colour in enumerate(obj_colours):
            m.geom_rgba[self._obj_geom[i], :3] = OBJECT_COLOURS[colour]
            adr = self._obj_qpos[i]
            d.qpos[adr:adr + 3] = [*obj_xy[i], TABLE_Z + OBJECT_HALF]
            d.qpos[adr + 3:adr + 7] = _quat_from_rpy(np.array([0.0, 0.0, obj_yaw[i]]))
        for i, colour in enumerate(pad_colours):
            m.geom_rgba[self._pad_geom[i], :3] = PAD_COLOURS[colour]
            m.geom_pos[self._pad_geom[i], :2] = pad_xy[i]
        d.qpos[self._fingers] = FINGER_OPEN
        d.ctrl[:] = FINGER_OPEN
        d.mocap_pos[0] = HOME
        d.mocap_quat[0] = [1, 0, 0, 0]
        self._task, self._object_names = spec, obj_colours
        self._pads = {c: Pad(c, np.array(xy), PAD_HALF) for c, xy in zip(pad_colours, pad_xy)}
        self._held, self._closed = None, False
        for _ in range(5 * self._substeps):  # let contacts settle before the first observation
            mj.mj_step(m, d)
        return self._observe()

    def step(self, action: np.ndarray) -> Observation:
        if self._task is None:
            raise RuntimeError("step() before reset()")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (ACTION_DIM,) or not np.all(np.isfinite(a)):
            raise ConfigError(f"an action must be 7 finite numbers [dx, dy, dz, droll, dpitch, dyaw, gripper], "
                              f"got {np.asarray(action).tolist()}")
        d = self.data
        d.mocap_pos[0] = np.clip(d.mocap_pos[0] + np.clip(a[:3], -MAX_TRANSLATION, MAX_TRANSLATION), EE_LOW, EE_HIGH)
        q = _quat_mul(_quat_from_rpy(np.clip(a[3:6], -MAX_ROTATION, MAX_ROTATION)), d.mocap_quat[0])
        d.mocap_quat[0] = q / np.linalg.norm(q)
        close = a[6] > 0.5
        if close and not self._closed:
            self._grasp()
        elif not close and self._held is not None:
            d.eq_active[self._weld[self._held]] = 0
            self._held = None
        self._closed = bool(close)
        d.ctrl[:] = 0.0 if close else FINGER_OPEN
        for _ in range(self._substeps):
            self._mj.mj_step(self.model, d)
        return self._observe()

    def _grasp(self) -> None:
        """Weld the cube whose centre lies between the fingertips, if any (see the module docstring)."""
        mj, m, d = self._mj, self.model, self.data
        ee_pos, ee_quat = d.mocap_pos[0], d.mocap_quat[0]
        for i in range(N_OBJECTS):
            p = d.xpos[self._obj_body[i]]
            if np.linalg.norm(p[:2] - ee_pos[:2]) < GRASP_XY and abs(p[2] - ee_pos[2]) < GRASP_Z:
                inv = np.zeros(4)
                mj.mju_negQuat(inv, ee_quat)
                rel_pos, rel_quat = np.zeros(3), np.zeros(4)
                mj.mju_rotVecQuat(rel_pos, p - ee_pos, inv)
                mj.mju_mulQuat(rel_quat, inv, d.xquat[self._obj_body[i]])
                w = self._weld[i]
                m.eq_data[w, :3] = 0.0
                m.eq_data[w, 3:6] = rel_pos
                m.eq_data[w, 6:10] = rel_quat
                m.eq_data[w, 10] = 1.0
                d.eq_active[w] = 1
                self._held = i
                return

    def expert(self) -> Expert:
        from vla_scale.eval.experts import SceneExpert

        if self._task is None:
            raise RuntimeError("expert() before reset()")
        return SceneExpert(self, self._task.name)

    def success(self) -> bool:
        if self._task is None:
            raise RuntimeError("success() before reset()")
        return self._task.success(self.scene())

    def scene(self) -> SceneView:
        d = self.data
        return SceneView(
            objects={n: d.xpos[self._obj_body[i]].copy() for i, n in enumerate(self._object_names)},
            object_half=OBJECT_HALF, pads=dict(self._pads), table_z=TABLE_Z,
            held=None if self._held is None else self._object_names[self._held],
            ee_pos=d.mocap_pos[0].copy(), ee_yaw=_yaw(d.mocap_quat[0]), gripper_closed=self._closed,
            goal=dict(self._goal))

    def _observe(self) -> Observation:
        d = self.data
        opening = float(np.mean(d.qpos[self._fingers])) / FINGER_OPEN
        state = np.concatenate([d.mocap_pos[0], d.mocap_quat[0], [opening]]).astype(np.float32)
        images = {}
        for cam in self.cameras:
            self._renderer.update_scene(d, camera=cam)
            images[cam] = self._renderer.render().copy()
        return Observation(images=images, instruction=self._instruction, state=state)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
