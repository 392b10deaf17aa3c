"""The built-in tabletop in NVIDIA Isaac Gym (Preview 4): a thin backend over gymapi and gymtorch.

Stated plainly: this backend has never been run against a real Isaac Gym.
Isaac Gym is not on any package registry and cannot be installed on the
machines this project is developed and tested on (no NVIDIA GPU, and its
bindings are built for Python 3.6-3.8 while vla-scale needs Python 3.10 or
newer). What is checked, in CI, is that every gymapi/gymtorch call here
exists and takes the arguments given: pyright checks this file against the
`isaacgym-stubs` package (gymapi) and the project's own stub for gymtorch
(typings/isaacgym/gymtorch.pyi); see pyrightconfig.json and
tests/test_eval_isaacgym.py. The same test runs this backend's own code
(layout, teleported gripper, attached grasp, tensor indexing, images) end
to end on tests/fake_isaacgym, a physics-free stand-in for gymapi and
gymtorch; that proves the bookkeeping, not Isaac Gym's behaviour. Physics
(grasps holding, pushes pushing, experts succeeding in PhysX) is untested.

Everything simulator-independent is shared with the MuJoCo backend and
tested through it: the tasks and their success predicates (`tasks`), the
suites (`perturbations.SUITES`), the task instance of a (task, seed)
(`layout.sample_layout`: the same colours, placements, goal and
instruction as `MujocoBackend`), the layout constants and action limits
(`mujoco_backend`), and the scripted experts (`experts.SceneExpert`, which
reads only `scene()`).

The scene: a fixed table box, four cubes (dynamic boxes), two pads and a
floating two-finger gripper loaded from a small URDF written at start-up
(a palm and two prismatic fingers under position drives). Choices, since
Isaac Gym has neither mocap bodies nor weld constraints:
- The gripper is kinematic by teleport: gravity is off for it, and before
  every physics step its root state (pose, and the velocity of the motion)
  is written with `set_actor_root_state_tensor_indexed`, moving it along the
  straight line from the old to the new target pose over the control step.
- The grasp is an attachment through the same tensor: when the gripper
  command switches to closed with a cube's centre between the fingertips
  (the MuJoCo backend's test and tolerances), the cube's pose relative to
  the palm is stored, and while the gripper stays closed the cube's root
  state is written to palm pose x that relative pose before every physics
  step. Opening the gripper releases it. As in the MuJoCo backend, policies
  learn when to close and open, not how hard.
- Pads are thin boxes that collide with nothing (collision filter bits
  shared with every cube, the table and the gripper) and have gravity off,
  so they can be placed through the root-state tensor like the cubes.

Vectorization: Isaac Gym simulates many environments in one sim; the
Backend interface runs one episode at a time, so one backend is one sim
with one environment (the rollout runner gets parallelism from worker
processes, one backend each). The tensor code indexes actors by their
global index, so it is written for the (environment, actor) layout a
batched runner would need, but only one environment is created.

Cameras are camera sensors read through the tensor API
(`get_camera_image_gpu_tensor`, wrapped by `gymtorch.wrap_tensor`, under
`start_access_image_tensors`; with `gpu_pipeline=False`, through
`get_camera_image`): "primary" looks at the table from where the
MuJoCo camera does, "wrist" is attached to the palm. Pixels are not
claimed to match the MuJoCo backend's or to be bit-identical across runs.

Perturbation variants other than "none" raise a ConfigError: they are
implemented only in the MuJoCo backend.

Import order (a real Isaac Gym rule): isaacgym's modules must be imported
before torch, or importing them raises ImportError. This module imports
nothing from either at import time; the constructor imports isaacgym first
and torch after it, and raises a ConfigError if torch was imported before.
In a worker process, construct this backend before anything imports torch
(or `import isaacgym` at the very top of the entry script). On its first
import gymtorch compiles a small C++ extension with torch's cpp_extension
(so a C++ compiler must be present).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Sequence, cast

import numpy as np

from vla_scale.errors import ConfigError
from vla_scale.eval.backend import check_action, UNPERTURBED, Observation, Pad, SceneView
from vla_scale.eval.layout import sample_layout
from vla_scale.eval.mujoco_backend import (CONTROL_DT, EE_HIGH, EE_LOW, FINGER_OPEN, GRASP_XY, GRASP_Z, HOME,
                                           MAX_ROTATION, MAX_TRANSLATION, N_OBJECTS, N_PADS, OBJECT_COLOURS,
                                           OBJECT_HALF, PAD_COLOURS, PAD_HALF, TABLE_Z, _quat_from_rpy, _quat_mul,
                                           _yaw)
from vla_scale.eval.perturbations import check_variant
from vla_scale.eval.tasks import TabletopBackend, get_task

if TYPE_CHECKING:  # bound for real by _import_isaacgym(), in that order
    import isaacgym.gymapi as gymapi
    import isaacgym.gymtorch as gymtorch
    import torch

PHYSICS_DT = 0.005  # seconds per Isaac Gym simulate() call (PhysX, 2 substeps each)
PHYSICS_SUBSTEPS = 2
TABLE_HALF = (0.4, 0.4, 0.02)  # the MuJoCo table's half sizes
PAD_THICKNESS = 0.001  # pads lie on the table, 1 mm thick (they collide with nothing)
# Collision filter bits (two shapes collide only if their filters share no bit): every cube has its own bit
# (cubes collide with each other, the table and the gripper); pads carry every bit (they collide with nothing).
CUBE_BIT = [1 << i for i in range(N_OBJECTS)]
TABLE_BIT = 1 << N_OBJECTS
GRIPPER_BIT = 1 << (N_OBJECTS + 1)
PAD_FILTER = sum(CUBE_BIT) | TABLE_BIT | GRIPPER_BIT
FINGER_STIFFNESS = 400.0  # N/m position drive on each finger
FINGER_DAMPING = 10.0
CUBE_DENSITY = 500.0  # kg/m^3: a 4 cm cube of 32 g
CAMERAS = {"primary": ((0.45, 0.0, 0.45), (0.0, 0.0, 0.0), 50.0),  # position, look-at point, horizontal fov
           "wrist": ((0.025, 0.0, 0.045), None, 75.0)}  # position in the palm frame, looking down
LIGHT = ((0.8, 0.8, 0.8), (0.3, 0.3, 0.3), (0.0, 0.0, -1.0))  # intensity, ambient, direction

INSTALL_HELP = (
    "Isaac Gym is not on any package registry (pip cannot find it): download Isaac Gym Preview 4 from NVIDIA's "
    "developer site (free registration), unpack it and run `pip install -e isaacgym/python` in the environment. "
    "It needs Linux, an NVIDIA GPU with its driver, and Python 3.6, 3.7 or 3.8 (its bindings are built for those "
    "only; 3.8 is recommended) - note that vla-scale itself requires Python 3.10 or newer. isaacgym must be "
    "imported before torch. This backend has never been run against a real Isaac Gym on the machines vla-scale is "
    "developed on; only its API calls are type-checked against the isaacgym-stubs package. The MuJoCo backend "
    "(`mujoco`) runs the same tasks with nothing to download.")


def _import_isaacgym() -> None:
    """Import gymapi, gymtorch and then torch into this module's globals (once)."""
    global gymapi, gymtorch, torch
    if "isaacgym" not in sys.modules:
        if importlib.util.find_spec("isaacgym") is None:
            raise ConfigError(f"the isaacgym backend needs the `isaacgym` package, which is not installed. "
                              f"{INSTALL_HELP}")
        if "torch" in sys.modules:
            raise ConfigError("isaacgym must be imported before torch (Isaac Gym refuses to load otherwise), but "
                              "torch is already imported in this process: construct IsaacGymBackend, or "
                              "`import isaacgym`, before anything imports torch (e.g. first thing in the worker's "
                              "entry point)")
    try:
        import isaacgym.gymapi as gymapi  # noqa: F811  (before torch: Isaac Gym's rule)
        import isaacgym.gymtorch as gymtorch  # noqa: F811  (imports torch itself, after gymapi)
    except ImportError as e:
        raise ConfigError(f"importing isaacgym failed ({e}). {INSTALL_HELP}") from e
    import torch  # noqa: F811


def _gripper_urdf() -> str:
    """A palm with two prismatic fingers, the MuJoCo gripper's shapes (boxes; sizes are full lengths)."""
    fingers = "".join(
        f"""
  <link name="finger_{side}">
    <visual><origin xyz="0 {sign * 0.006} 0.02"/><geometry><box size="0.02 0.012 0.07"/></geometry></visual>
    <collision><origin xyz="0 {sign * 0.006} 0.02"/><geometry><box size="0.02 0.012 0.07"/></geometry></collision>
    <inertial><mass value="0.05"/><inertia ixx="2.1e-5" iyy="2.2e-5" izz="2.3e-6" ixy="0" ixz="0" iyz="0"/></inertial>
  </link>
  <joint name="finger_{side}" type="prismatic">
    <parent link="palm"/><child link="finger_{side}"/><axis xyz="0 {sign} 0"/>
    <limit lower="0" upper="{FINGER_OPEN}" effort="100" velocity="1"/>
  </joint>""" for side, sign in (("l", 1), ("r", -1)))
    return f"""<?xml version="1.0"?>
<robot name="vla_scale_gripper">
  <link name="palm">
    <visual><origin xyz="0 0 0.055"/><geometry><box size="0.024 0.11 0.02"/></geometry></visual>
    <collision><origin xyz="0 0 0.055"/><geometry><box size="0.024 0.11 0.02"/></geometry></collision>
    <inertial><origin xyz="0 0 0.055"/><mass value="0.2"/>
      <inertia ixx="2.1e-4" iyy="1.6e-5" izz="2.1e-4" ixy="0" ixz="0" iyz="0"/></inertial>
  </link>{fingers}
</robot>
"""


def _xyzw(wxyz: np.ndarray) -> np.ndarray:
    return np.array([wxyz[1], wxyz[2], wxyz[3], wxyz[0]])


def _wxyz(xyzw: np.ndarray) -> np.ndarray:
    return np.array([xyzw[3], xyzw[0], xyzw[1], xyzw[2]])


def _rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate vector v by the wxyz unit quaternion q."""
    w, u = q[0], q[1:]
    return v + 2.0 * np.cross(u, np.cross(u, v) + w * v)


def _conj(q: np.ndarray) -> np.ndarray:
    return np.array([q[0], -q[1], -q[2], -q[3]])


class IsaacGymBackend(TabletopBackend):
    """The tabletop in Isaac Gym: one sim, one environment. See the module docstring (never run for real)."""

    name = "isaacgym"
    in_process_ok = False  # isaacgym must be imported before torch: the runner always spawns a worker

    def __init__(self, *, cameras: Sequence[str] = ("primary",), image_size: int = 128, device_id: int = 0,
                 graphics_device_id: int | None = None, gpu_pipeline: bool = True) -> None:
        """All arguments are plain values (picklable, for spawn workers). `gpu_pipeline=False` keeps the state
        tensors in CPU memory (PhysX still runs on `device_id`) and reads images with get_camera_image."""
        unknown = set(cameras) - set(CAMERAS)
        if unknown:
            raise ConfigError(f"unknown camera(s) {sorted(unknown)}; the Isaac Gym tabletop has 'primary' and 'wrist'")
        if image_size not in (128, 224):
            raise ConfigError(f"image_size must be 128 or 224 (the sizes the encoders take), got {image_size}")
        _import_isaacgym()
        self.cameras = tuple(cameras)
        self.image_size = image_size
        self.gpu_pipeline = gpu_pipeline
        self.device = torch.device(f"cuda:{device_id}" if gpu_pipeline else "cpu")
        self._urdf_dir = tempfile.TemporaryDirectory(prefix="vla_scale_isaacgym_")
        self._gym = gymapi.acquire_gym()
        self._sim = self._create_sim(device_id, device_id if graphics_device_id is None else graphics_device_id)
        self._alive = True
        self._camera_handles: dict[str, int] = {}
        self._build_env()
        self._gym.prepare_sim(self._sim)
        # Tensor views over the simulator's state (GPU pipeline): 13 numbers per actor (position, quaternion xyzw,
        # linear and angular velocity) and 2 per DOF (position, velocity). refresh_* updates them in place.
        self._root = gymtorch.wrap_tensor(self._gym.acquire_actor_root_state_tensor(self._sim))
        self._dofs = gymtorch.wrap_tensor(self._gym.acquire_dof_state_tensor(self._sim))
        self._finger_targets = torch.full((self._gym.get_sim_dof_count(self._sim),), FINGER_OPEN,
                                          dtype=torch.float32, device=self.device)
        self._steps_per_control = round(CONTROL_DT / PHYSICS_DT)
        self._task = None
        self._goal: dict[str, str] = {}
        self._instruction = ""
        self._object_names: list[str] = []
        self._pads: dict[str, Pad] = {}
        self._held: int | None = None
        self._held_rel: tuple[np.ndarray, np.ndarray] | None = None  # held cube's (position, wxyz) in the palm frame
        self._closed = False
        self._ee_pos = HOME.copy()
        self._ee_quat = np.array([1.0, 0.0, 0.0, 0.0])

    # -- construction ----------------------------------------------------------------------
    def _create_sim(self, device_id: int, graphics_device_id: int) -> gymapi.Sim:
        params = gymapi.SimParams()
        params.dt = PHYSICS_DT
        params.substeps = PHYSICS_SUBSTEPS
        params.up_axis = gymapi.UP_AXIS_Z
        params.gravity = gymapi.Vec3(0.0, 0.0, -9.81)
        params.use_gpu_pipeline = self.gpu_pipeline
        params.physx.use_gpu = True
        params.physx.solver_type = 1  # TGS
        params.physx.num_position_iterations = 8
        params.physx.num_velocity_iterations = 1
        params.physx.contact_offset = 0.002
        params.physx.rest_offset = 0.0
        sim = self._gym.create_sim(device_id, graphics_device_id, gymapi.SIM_PHYSX, params)
        if sim is None:
            raise RuntimeError(f"Isaac Gym could not create a PhysX sim on GPU {device_id} "
                               f"(graphics device {graphics_device_id})")
        return sim

    def _build_env(self) -> None:
        gym, sim = self._gym, self._sim
        env = gym.create_env(sim, gymapi.Vec3(-0.5, -0.5, -0.1), gymapi.Vec3(0.5, 0.5, 0.5), 1)
        self._env = env
        group = 0  # this environment's collision group

        def pose(x: float, y: float, z: float) -> gymapi.Transform:
            return gymapi.Transform(p=gymapi.Vec3(x, y, z), r=gymapi.Quat(0.0, 0.0, 0.0, 1.0))

        fixed = gymapi.AssetOptions()
        fixed.fix_base_link = True
        table = gym.create_box(sim, 2 * TABLE_HALF[0], 2 * TABLE_HALF[1], 2 * TABLE_HALF[2], fixed)
        self._table = gym.create_actor(env, table, pose(0.0, 0.0, TABLE_Z - TABLE_HALF[2]), "table", group, TABLE_BIT)
        gym.set_rigid_body_color(env, self._table, 0, gymapi.MESH_VISUAL, gymapi.Vec3(0.55, 0.4, 0.28))

        floating = gymapi.AssetOptions()
        floating.disable_gravity = True
        pad = gym.create_box(sim, 2 * PAD_HALF, 2 * PAD_HALF, PAD_THICKNESS, floating)
        self._pad_actors = [gym.create_actor(env, pad, pose(0.0, 0.3 + 0.12 * i, TABLE_Z), f"pad{i}", group,
                                             PAD_FILTER) for i in range(N_PADS)]

        cube_options = gymapi.AssetOptions()
        cube_options.density = CUBE_DENSITY
        cube = gym.create_box(sim, 2 * OBJECT_HALF, 2 * OBJECT_HALF, 2 * OBJECT_HALF, cube_options)
        self._cubes = [gym.create_actor(env, cube, pose(-0.3 + 0.1 * i, 0.35, TABLE_Z + OBJECT_HALF), f"obj{i}",
                                        group, CUBE_BIT[i]) for i in range(N_OBJECTS)]
        for handle in self._cubes:
            props = gym.get_actor_rigid_shape_properties(env, handle)
            for p in props:
                p.friction = 1.0
            gym.set_actor_rigid_shape_properties(env, handle, props)

        with open(os.path.join(self._urdf_dir.name, "gripper.urdf"), "w") as f:
            f.write(_gripper_urdf())
        gripper_options = gymapi.AssetOptions()
        gripper_options.disable_gravity = True
        gripper_options.fix_base_link = False  # floating: moved by writing its root state (module docstring)
        gripper = gym.load_asset(sim, self._urdf_dir.name, "gripper.urdf", gripper_options)
        self._gripper = gym.create_actor(env, gripper, pose(*HOME), "gripper", group, GRIPPER_BIT)
        dof_props = gym.get_actor_dof_properties(env, self._gripper)
        dof_props["driveMode"].fill(gymapi.DOF_MODE_POS)
        dof_props["stiffness"].fill(FINGER_STIFFNESS)
        dof_props["damping"].fill(FINGER_DAMPING)
        gym.set_actor_dof_properties(env, self._gripper, dof_props)
        self._palm = gym.find_actor_rigid_body_handle(env, self._gripper, "palm")

        index = lambda handle: gym.get_actor_index(env, handle, gymapi.DOMAIN_SIM)  # noqa: E731
        self._cube_idx = [index(h) for h in self._cubes]
        self._pad_idx = [index(h) for h in self._pad_actors]
        self._gripper_idx = index(self._gripper)

        for name in self.cameras:
            position, target, fov = CAMERAS[name]
            props = gymapi.CameraProperties()
            props.width = props.height = self.image_size
            props.horizontal_fov = fov
            props.enable_tensors = self.gpu_pipeline
            cam = gym.create_camera_sensor(env, props)
            if target is not None:
                gym.set_camera_location(cam, env, gymapi.Vec3(*position), gymapi.Vec3(*target))
            else:  # cameras look along their +x: turn +x to point down the palm's -z
                half = np.pi / 4  # a quarter turn about y, as a quaternion (x, y, z, w)
                local = gymapi.Transform(p=gymapi.Vec3(*position), r=gymapi.Quat(0.0, np.sin(half), 0.0, np.cos(half)))
                gym.attach_camera_to_body(cam, env, self._palm, local, gymapi.FOLLOW_TRANSFORM)
            self._camera_handles[name] = cam
        intensity, ambient, direction = LIGHT
        gym.set_light_parameters(sim, 0, gymapi.Vec3(*intensity), gymapi.Vec3(*ambient), gymapi.Vec3(*direction))

    # -- episode ---------------------------------------------------------------------------
    def reset(self, task: str, seed: int, perturbation: str | None = None) -> Observation:
        variant = check_variant(perturbation)
        if variant != UNPERTURBED:
            raise ConfigError(f"perturbation variant {variant!r}: perturbations are implemented only in the MuJoCo "
                              f"backend; the isaacgym backend runs the unperturbed tasks ('none')")
        layout = sample_layout(task, seed)
        gym, env = self._gym, self._env
        for i, colour in enumerate(layout.object_colours):
            gym.set_rigid_body_color(env, self._cubes[i], 0, gymapi.MESH_VISUAL, gymapi.Vec3(*OBJECT_COLOURS[colour]))
        for i, colour in enumerate(layout.pad_colours):
            gym.set_rigid_body_color(env, self._pad_actors[i], 0, gymapi.MESH_VISUAL, gymapi.Vec3(*PAD_COLOURS[colour]))

        # Rows are written here and sent with the first physics step's indexed set (one root-state set per
        # simulate() call: a second set, or a refresh, before simulate() could drop or overwrite this one).
        for i in range(N_OBJECTS):
            q = _quat_from_rpy(np.array([0.0, 0.0, layout.object_yaw[i]]))
            self._write_root(self._cube_idx[i], np.array([*layout.object_xy[i], TABLE_Z + OBJECT_HALF]), q)
        for i in range(N_PADS):
            z = TABLE_Z + PAD_THICKNESS / 2
            self._write_root(self._pad_idx[i], np.array([*layout.pad_xy[i], z]), np.array([1.0, 0.0, 0.0, 0.0]))
        self._ee_pos, self._ee_quat = HOME.copy(), np.array([1.0, 0.0, 0.0, 0.0])
        self._write_root(self._gripper_idx, self._ee_pos, self._ee_quat)
        self._dofs[:, 0] = FINGER_OPEN
        self._dofs[:, 1] = 0.0
        gym.set_dof_state_tensor(self._sim, gymtorch.unwrap_tensor(self._dofs))
        self._finger_targets.fill_(FINGER_OPEN)
        gym.set_dof_position_target_tensor(self._sim, gymtorch.unwrap_tensor(self._finger_targets))

        self._task = get_task(task)
        self._goal, self._instruction = dict(layout.goal), layout.instruction
        self._object_names = list(layout.object_colours)
        self._pads = layout.pads()
        self._held, self._held_rel, self._closed = None, None, False
        placed = [*self._cube_idx, *self._pad_idx]
        for k in range(5):  # let contacts settle before the first observation, as the MuJoCo backend does
            self._advance(self._ee_pos, self._ee_quat, placed if k == 0 else [])
        return self._observe()

    def step(self, action: np.ndarray) -> Observation:
        if self._task is None:
            raise RuntimeError("step() before reset()")
        a = check_action(action)
        pos = np.clip(self._ee_pos + np.clip(a[:3], -MAX_TRANSLATION, MAX_TRANSLATION), EE_LOW, EE_HIGH)
        q = _quat_mul(_quat_from_rpy(np.clip(a[3:6], -MAX_ROTATION, MAX_ROTATION)), self._ee_quat)
        quat = q / np.linalg.norm(q)
        close = bool(a[6] > 0.5)
        if close and not self._closed:
            self._grasp()
        elif not close and self._held is not None:
            self._held, self._held_rel = None, None
        self._closed = close
        self._finger_targets.fill_(0.0 if close else FINGER_OPEN)
        self._gym.set_dof_position_target_tensor(self._sim, gymtorch.unwrap_tensor(self._finger_targets))
        self._advance(pos, quat)
        return self._observe()

    def _advance(self, pos: np.ndarray, quat: np.ndarray, placed: Sequence[int] = ()) -> None:
        """One control step: move the gripper (and what it holds) from its pose to (pos, quat) over the
        physics steps, writing their root states before each (see the module docstring). `placed`: actors
        whose rows of the root-state tensor were written by reset, sent along with the first step's set.

        Only the written rows are sent (indexed set), so the rest of the tensor need not be fresh; it is
        refreshed once, after the last physics step, for scene() and the grasp test to read."""
        gym, sim = self._gym, self._sim
        start = self._ee_pos
        n = self._steps_per_control
        velocity = (pos - start) / CONTROL_DT
        moving = [self._gripper_idx] + ([] if self._held is None else [self._cube_idx[self._held]])
        for k in range(n):
            p = start + (pos - start) * (k + 1) / n
            indices = moving + list(placed) if k == 0 else moving
            index_tensor = torch.tensor(indices, dtype=torch.int32, device=self.device)
            self._write_root(self._gripper_idx, p, quat, velocity)
            if self._held is not None and self._held_rel is not None:
                rel_pos, rel_quat = self._held_rel
                self._write_root(self._cube_idx[self._held], p + _rotate(quat, rel_pos), _quat_mul(quat, rel_quat),
                                 velocity)
            gym.set_actor_root_state_tensor_indexed(sim, gymtorch.unwrap_tensor(self._root),
                                                    gymtorch.unwrap_tensor(index_tensor), len(indices))
            gym.simulate(sim)
            gym.fetch_results(sim, True)
        gym.refresh_actor_root_state_tensor(sim)
        gym.refresh_dof_state_tensor(sim)
        self._ee_pos, self._ee_quat = pos.copy(), quat.copy()

    def _write_root(self, index: int, pos: np.ndarray, wxyz: np.ndarray,
                    velocity: np.ndarray | None = None) -> None:
        state = np.zeros(13, dtype=np.float32)
        state[:3], state[3:7] = pos, _xyzw(wxyz)
        if velocity is not None:
            state[7:10] = velocity
        self._root[index] = torch.from_numpy(state).to(self.device)

    def _grasp(self) -> None:
        """Attach the cube whose centre lies between the fingertips, if any (the MuJoCo backend's test)."""
        for i in range(N_OBJECTS):
            p = self._root_pos(self._cube_idx[i])
            if np.linalg.norm(p[:2] - self._ee_pos[:2]) < GRASP_XY and abs(p[2] - self._ee_pos[2]) < GRASP_Z:
                inv = _conj(self._ee_quat)
                cube_quat = _wxyz(self._root[self._cube_idx[i], 3:7].cpu().numpy().astype(np.float64))
                self._held_rel = (_rotate(inv, p - self._ee_pos), _quat_mul(inv, cube_quat))
                self._held = i
                return

    def _root_pos(self, index: int) -> np.ndarray:
        return self._root[index, :3].cpu().numpy().astype(np.float64)

    def scene(self) -> SceneView:
        return SceneView(
            objects={n: self._root_pos(self._cube_idx[i]) for i, n in enumerate(self._object_names)},
            object_half=OBJECT_HALF, pads=dict(self._pads), table_z=TABLE_Z,
            held=None if self._held is None else self._object_names[self._held],
            ee_pos=self._ee_pos.copy(), ee_yaw=_yaw(self._ee_quat), gripper_closed=self._closed,
            goal=dict(self._goal))

    def _observe(self) -> Observation:
        opening = float(self._dofs[:, 0].mean().item()) / FINGER_OPEN
        state = np.concatenate([self._ee_pos, self._ee_quat, [opening]]).astype(np.float32)
        images: dict[str, np.ndarray] = {}
        if self._camera_handles:
            gym, sim = self._gym, self._sim
            gym.step_graphics(sim)
            gym.render_all_camera_sensors(sim)
            if not self.gpu_pipeline:
                for name, cam in self._camera_handles.items():
                    # The stub types this as `object`; it is a uint8 numpy array (H, W * 4), RGBA.
                    rgba = np.asarray(gym.get_camera_image(sim, self._env, cam, gymapi.IMAGE_COLOR), dtype=np.uint8)
                    images[name] = rgba.reshape(self.image_size, self.image_size, 4)[:, :, :3].copy()
                return Observation(images=images, instruction=self._instruction, state=state)
            gym.start_access_image_tensors(sim)
            try:
                for name, cam in self._camera_handles.items():
                    # The stub types this as `object`; it is a gymapi.Tensor (H, W, 4) uint8 RGBA on the GPU.
                    raw = cast(gymapi.Tensor, gym.get_camera_image_gpu_tensor(sim, self._env, cam, gymapi.IMAGE_COLOR))
                    images[name] = gymtorch.wrap_tensor(raw)[:, :, :3].cpu().numpy().copy()
            finally:
                gym.end_access_image_tensors(sim)
        return Observation(images=images, instruction=self._instruction, state=state)

    def close(self) -> None:
        if getattr(self, "_alive", False):
            self._alive = False
            for cam in self._camera_handles.values():
                self._gym.destroy_camera_sensor(self._sim, self._env, cam)
            self._gym.destroy_sim(self._sim)
        if hasattr(self, "_urdf_dir"):
            self._urdf_dir.cleanup()
