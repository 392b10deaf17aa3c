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
environments. The base scene (colours, placements, goal, instruction)
comes from one numpy Generator seeded by `reset`'s seed, so a (task, seed)
pair always gives the same scene and the same pixels.

Perturbations (`reset(task, seed, variant)`; names, suites and ranges in
`perturbations.py`): a variant's own parameters come from a second
Generator seeded by (seed, variant index), so the base scene never
changes with the variant. MuJoCo cannot add geoms after compiling, so the
model holds everything any variant needs, inactive by default: builtin
textures and materials (table and background), a back wall and floor
parked 50 m below the table, three distractor bodies resting on a shelf
under the table. A variant writes model arrays at reset (geom_rgba,
geom_matid, geom_pos, geom_type, geom_condim, geom_friction, light_diffuse,
light_dir, light_pos, cam_pos, cam_quat) and data.qpos of the distractors;
every reset first restores those arrays to their compiled values.
`<statistic>` is pinned to the values of the scene without these props,
so unperturbed episodes render exactly as before they existed. Novel
objects change the cube geoms' type (cylinder, sphere: same 2 cm
half-height, so `object_half` and the predicates hold); their mass and
inertia stay the cube's. Spheres get rolling friction (condim 6) so they
slide to a stop instead of rolling away.

MuJoCo versions: only arrays and enums present in 3.1 are used. Before
3.3 MuJoCo finds a single contact per convex pair unless the multiccd
flag is on, so the constructor enables it when `mjENBL_MULTICCD` exists
(later versions always do this and have no such flag).
"""
from __future__ import annotations

import colorsys
from typing import Callable, Sequence

import numpy as np

from vla_scale.errors import ConfigError
from vla_scale.eval.backend import check_action, Observation, Pad, SceneView
from vla_scale.eval.perturbations import NOVEL_OBJECTS, PARAPHRASE, VARIANTS, check_variant
from vla_scale.eval.tasks import NEAR_DISTANCE, TabletopBackend, get_task

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
OBJECT_AT_STREAM = 0x5B07  # the second seed word of the generator that picks an `object_at` spot
PAD_CLEARANCE = PAD_HALF * np.sqrt(2) + OBJECT_HALF * 2  # a cube's centre keeps this far from a pad's centre

# -- perturbations (see perturbations.py for the suites; every range below is what `reset` draws from) --
# novel_objects: colours that no training scene has, the shapes' nouns, and the placement area (the band
# around the training area that the primary camera sees and the experts reach: a push starts 65 mm behind
# its object and the gripper's target is clipped at 0.3 m).
NOVEL_COLOURS = {"cyan": (0.05, 0.8, 0.85), "magenta": (0.9, 0.05, 0.6), "pink": (1.0, 0.6, 0.7),
                 "brown": (0.35, 0.18, 0.05), "teal": (0.0, 0.42, 0.42), "olive": (0.45, 0.5, 0.1)}
NOVEL_SHAPES = {"cylinder": "cylinder", "sphere": "ball"}  # shape -> the noun instructions use
# Spheres get rolling friction (condim 6), so a pushed or released ball slides and stops like a puck instead of
# rolling off (without it the push expert solved 2 of 60 episodes, with it 60 of 60).
SPHERE_FRICTION = (1.0, 0.01, 0.02)
NOVEL_LOW, NOVEL_HIGH = np.array([-0.23, -0.23]), np.array([0.22, 0.23])
# distractors: (name, geom type, size); at most three per episode, never task objects, never grasped.
DISTRACTORS = (("can", "cylinder", (0.022, 0.035, 0.0)), ("box", "box", (0.035, 0.022, 0.015)),
               ("disc", "cylinder", (0.035, 0.008, 0.0)))
DISTRACTOR_LOW, DISTRACTOR_HIGH = np.array([-0.22, -0.22]), np.array([0.2, 0.22])
DISTRACTOR_OBJECT_GAP = 0.14  # centre to task-object centre: clear of the open fingers beside any cube
DISTRACTOR_GAP = 0.09  # between distractors
DISTRACTOR_PATH_GAP = 0.1  # from the straight path of the goal object to its target (the palm is 11 cm wide)
PARK_Z = -0.5  # unused distractors rest on a shelf this far under the table, hidden by the table
# camera_shift: the primary camera moves by up to this much per world axis and turns by up to this much
# about each of its own axes.
CAMERA_SHIFT = 0.02
CAMERA_TURN = np.deg2rad(2.5)
# lighting: the sun's diffuse intensity is scaled by a factor in LIGHT_SCALE; its direction is tilted
# from vertical by an angle in LIGHT_TILT towards a uniformly drawn azimuth.
LIGHT_SCALE = (0.4, 1.25)
LIGHT_TILT = (np.deg2rad(15), np.deg2rad(45))
TABLE_RGBA = (0.55, 0.4, 0.28, 1.0)
TABLE_TEXTURES = ("checker", "checker_large", "grid", "noise", "gradient")
BACKGROUND_TEXTURES = (None, "checker", "grid", "gradient")
BG_WALL_POS, BG_FLOOR_POS, BG_HIDDEN_POS = (-1.2, 0.0, 0.0), (0.0, 0.0, -0.75), (0.0, 0.0, -50.0)
# The primary camera's default pose, and the part of the image objects must fall into when placed outside
# the training area (the training area's own corners reach 21 degrees off the optical axis).
PRIMARY_POS = np.array([0.45, 0.0, 0.45])
PRIMARY_HALF_FOV = np.deg2rad(25)
VIEW_LIMIT = np.tan(np.deg2rad(21))


# The model arrays the perturbation variants change (restored to their compiled values at every reset).
_PERTURBED_ARRAYS = ("geom_rgba", "geom_matid", "geom_pos", "geom_type", "geom_condim", "geom_friction",
                     "light_diffuse", "light_dir", "light_pos", "cam_pos", "cam_quat")


def _load_triton_before_gl() -> None:
    """Import triton, if installed, before the first GL context exists.

    On the software renderer (Mesa llvmpipe) a GL context loads Mesa's LLVM; importing triton (which
    bundles its own LLVM, and which transformers and streaming import) after that segfaults the
    process. Loaded in the other order, both work and the pixels are the same."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


def _textures() -> str:
    t = ('<texture name="tex_checker" type="2d" builtin="checker" rgb1="1 1 1" rgb2="0.45 0.45 0.45" '
         'width="64" height="64"/>'
         '<texture name="tex_grid" type="2d" builtin="flat" mark="edge" rgb1="1 1 1" markrgb="0.25 0.25 0.25" '
         'width="64" height="64"/>'
         '<texture name="tex_noise" type="2d" builtin="flat" mark="random" random="0.3" rgb1="1 1 1" '
         'markrgb="0.4 0.4 0.4" width="128" height="128"/>'
         '<texture name="tex_gradient" type="2d" builtin="gradient" rgb1="1 1 1" rgb2="0.35 0.35 0.35" '
         'width="128" height="128"/>')
    repeat = {"checker": ("checker", 10), "checker_large": ("checker", 4), "grid": ("grid", 16),
              "noise": ("noise", 2), "gradient": ("gradient", 1)}
    mats = "".join(f'<material name="table_{n}" texture="tex_{tex}" texrepeat="{r} {r}" texuniform="true"/>'
                   for n, (tex, r) in repeat.items())
    mats += "".join(f'<material name="bg_{n}" texture="tex_{n}" texrepeat="{r} {r}" texuniform="true"/>'
                    for n, r in (("checker", 3), ("grid", 6), ("gradient", 1)))
    return t + mats


def _scene_xml(image_size: int, table_rgb: Sequence[float] = TABLE_RGBA[:3]) -> str:
    objects = "\n".join(
        f'<body name="obj{i}" pos="0 0 {TABLE_Z + OBJECT_HALF}"><freejoint name="obj{i}"/>'
        f'<geom name="obj{i}" type="box" size="{OBJECT_HALF} {OBJECT_HALF} {OBJECT_HALF}" '
        f'friction="1 0.01 0.001" rgba="1 1 1 1"/></body>' for i in range(N_OBJECTS))
    pads = "\n".join(
        f'<geom name="pad{i}" type="box" size="{PAD_HALF} {PAD_HALF} 0.001" pos="0 0 {TABLE_Z + 0.001}" '
        f'contype="0" conaffinity="0" rgba="1 1 1 1"/>' for i in range(N_PADS))
    distractors = "\n".join(
        f'<body name="dis{k}" pos="{-0.15 + 0.15 * k} 0 {PARK_Z + 0.01 + size[1 if kind == "cylinder" else 2]}">'
        f'<freejoint name="dis{k}"/><geom name="dis{k}" type="{kind}" size="{" ".join(map(str, size))}" '
        f'friction="1 0.01 0.001" rgba="1 1 1 1"/></body>' for k, (_, kind, size) in enumerate(DISTRACTORS))
    # Stiff welds (solref 4 ms): with the default 20 ms a carried cube lagged 2 cm behind the fingers and
    # was flung away when released (2 of 20 pick-and-place episodes succeeded).
    welds = "\n".join(f'<weld name="grasp{i}" body1="ee" body2="obj{i}" active="false" solref="0.004 1"/>'
                      for i in range(N_OBJECTS))
    return f"""
<mujoco model="vla_scale_tabletop">
  <option timestep="{PHYSICS_DT}" gravity="0 0 -9.81"/>
  <visual><global offwidth="{max(image_size, 640)}" offheight="{max(image_size, 480)}"/>
    <quality shadowsize="0"/></visual>
  <!-- Pinned to the values of the scene without the perturbation props, which then renders and
       simulates as before (they scale the clip planes and visual decor). -->
  <statistic extent="1.1320777358467926" center="0 0 -0.02" meansize="0.038503243003426904"
             meanmass="0.0584"/>
  <asset>{_textures()}</asset>
  <worldbody>
    <light name="sun" pos="0 0 1.5" dir="0 0 -1" directional="true" castshadow="false" diffuse="0.8 0.8 0.8"/>
    <geom name="table" type="box" size="0.4 0.4 0.02" pos="0 0 {TABLE_Z - 0.02}"
          rgba="{' '.join(map(str, (*table_rgb, 1.0)))}"/>
    {pads}
    <geom name="bg_wall" type="box" size="0.01 2 1.2" pos="{' '.join(map(str, BG_HIDDEN_POS))}"
          contype="0" conaffinity="0" rgba="1 1 1 1"/>
    <geom name="bg_floor" type="box" size="2 2 0.01" pos="{' '.join(map(str, BG_HIDDEN_POS))}"
          contype="0" conaffinity="0" rgba="1 1 1 1"/>
    <geom name="parking" type="box" size="0.3 0.1 0.01" pos="0 0 {PARK_Z}" rgba="0.2 0.2 0.2 1"/>
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
    {distractors}
  </worldbody>
  <!-- The fingers overlap the palm. MuJoCo 4.0 made no contacts between them (parent and child bodies);
       3.1.6 did (seen: 10 extra contacts; presumably because the palm's body is a mocap body, which counts
       as welded to the world, and the world is exempt from parent filtering). Their friction held the
       fingers open and 19 of 20 pushes failed on 3.1.6. The exclusion changes nothing on 4.0. -->
  <contact><exclude body1="ee" body2="finger_l"/><exclude body1="ee" body2="finger_r"/></contact>
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
                  what: str, low: np.ndarray = AREA_LOW, high: np.ndarray = AREA_HIGH,
                  accept: Callable[[np.ndarray], bool] | None = None) -> list[np.ndarray]:
    """`n` points uniform in [low, high], `gap` apart, each at least r from every (centre, r) in `avoid`
    and passing `accept`."""
    points: list[np.ndarray] = []
    for _ in range(10_000):
        p = rng.uniform(low, high)
        if (all(np.linalg.norm(p - q) >= gap for q in points) and all(np.linalg.norm(p - c) >= r for c, r in avoid)
                and (accept is None or accept(p))):
            points.append(p)
            if len(points) == n:
                return points
    # A bug in the layout constants, not a user error.
    raise RuntimeError(f"could not place {n} {what} apart in the table area")


def _in_training_area(xy: np.ndarray, margin: float = 0.0) -> bool:
    return bool(np.all(xy >= AREA_LOW - margin) and np.all(xy <= AREA_HIGH + margin))


def _in_primary_view(xy: np.ndarray, limit: float = VIEW_LIMIT) -> bool:
    """Whether a point on the table lies within `limit` (tangent) of the default primary camera's axis."""
    v = np.array([xy[0], xy[1], TABLE_Z + OBJECT_HALF]) - PRIMARY_POS
    forward, right, up = np.array([-1, 0, -1]) / np.sqrt(2), np.array([0, 1, 0]), np.array([-1, 0, 1]) / np.sqrt(2)
    depth = float(v @ forward)
    return depth > 0 and abs(v @ right) / depth <= limit and abs(v @ up) / depth <= limit


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip((p - a) @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _random_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]
                   ) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value)))


class MujocoBackend(TabletopBackend):
    """The tabletop scene. `cameras=()` turns rendering off (physics only, for fast expert checks)."""

    name = "mujoco"

    def __init__(self, *, cameras: Sequence[str] = ("primary",), image_size: int = 128, objects: int = N_OBJECTS,
                 pads: int = N_PADS, table_rgb: Sequence[float] | None = None,
                 pad_at: Sequence[float] | None = None,
                 object_at: Sequence[Sequence[float]] | None = None) -> None:
        import mujoco

        if not (isinstance(objects, int) and 1 <= objects <= N_OBJECTS):
            raise ConfigError(f"objects must be 1 to {N_OBJECTS} (cubes on the table), got {objects!r}")
        if not (isinstance(pads, int) and 1 <= pads <= N_PADS):
            raise ConfigError(f"pads must be 1 to {N_PADS}, got {pads!r}")
        # Fewer cubes or pads (a simpler scene, e.g. the demo's): the episode's layout is drawn exactly as
        # always, then the goal's cubes and pad are kept with the first others up to the count, and the rest
        # are parked on the shelf under the table (cubes) or hidden with the background (pads).
        self.n_objects, self.n_pads = objects, pads
        # A fixed place for the (one) pad, e.g. the demo's: the target is always there and the policy has to
        # find only the cube by sight. The pads are drawn as always, then moved there, and the cubes are
        # drawn clear of it, so the layout from this point on differs from the default scene's.
        self.pad_at = None
        if pad_at is not None:
            at = np.asarray(pad_at, dtype=np.float64)
            if at.shape != (2,) or not np.all(np.isfinite(at)) or not _in_training_area(at):
                raise ConfigError(f"pad_at must be an (x, y) inside the placement area {AREA_LOW.tolist()} to "
                                  f"{AREA_HIGH.tolist()} m, got {pad_at!r}")
            if pads != 1:
                raise ConfigError(f"pad_at places one pad: it needs pads=1, got pads={pads}")
            self.pad_at = at
        # Spots for the (one) cube, e.g. the demo's: each episode puts the goal cube on one of them, drawn
        # from the episode seed by a generator of its own (every other draw stays as without it), so the
        # policy has to see which spot it is on but not regress its place from anywhere on the table.
        self.object_at = None
        if object_at is not None:
            try:
                spots = np.asarray(object_at, dtype=np.float64)
            except (TypeError, ValueError):
                spots = np.zeros((0, 2))
            if spots.ndim != 2 or spots.shape[1] != 2 or len(spots) == 0 or not np.all(np.isfinite(spots)) \
                    or not all(_in_training_area(p) for p in spots):
                raise ConfigError(f"object_at must be a list of (x, y) spots inside the placement area "
                                  f"{AREA_LOW.tolist()} to {AREA_HIGH.tolist()} m, got {object_at!r}")
            if objects != 1 or self.pad_at is None:
                raise ConfigError(f"object_at places the one cube: it needs objects=1 and pad_at (so that no spot "
                                  f"lies on a pad), got objects={objects}, pad_at={pad_at!r}")
            close = [p.tolist() for p in spots if np.linalg.norm(p - self.pad_at) < PAD_CLEARANCE]
            if close:
                raise ConfigError(f"object_at: spots {close} are within {PAD_CLEARANCE:.3f} m of the pad at "
                                  f"{self.pad_at.tolist()}; a cube there would touch it")
            self.object_at = spots
        # The table's colour (default TABLE_RGBA's); the table_colour variant draws away from whichever it is.
        table = tuple(float(c) for c in (TABLE_RGBA[:3] if table_rgb is None else table_rgb))
        if len(table) != 3 or not all(0.0 <= c <= 1.0 for c in table):
            raise ConfigError(f"table_rgb must be three numbers in [0, 1], got {table_rgb!r}")
        self.table_rgb = table
        # Pads draw their colours from those that stand out from the table (all three on the default table).
        self.pad_palette = [c for c, rgb in PAD_COLOURS.items() if np.linalg.norm(np.subtract(rgb, table)) >= 0.15]
        if len(self.pad_palette) < N_PADS:
            raise ConfigError(f"table_rgb {table} leaves fewer than {N_PADS} pad colours that stand out from it")

        unknown = set(cameras) - {"primary", "wrist"}
        if unknown:
            raise ConfigError(f"unknown camera(s) {sorted(unknown)}; the MuJoCo tabletop has 'primary' and 'wrist'")
        if image_size not in (128, 224):
            raise ConfigError(f"image_size must be 128 or 224 (the sizes the encoders take), got {image_size}")
        self._mj = mujoco
        self.model = mujoco.MjModel.from_xml_string(_scene_xml(image_size, self.table_rgb))
        self.model.light_castshadow[:] = 0  # see the module docstring: shadows dominate software render time
        if hasattr(mujoco.mjtEnableBit, "mjENBL_MULTICCD"):
            # MuJoCo before 3.3 (LIBERO's pin) finds one contact per convex pair unless asked for several:
            # a cylinder (novel objects, distractors) then rocks on the table and no expert episode with
            # cylinders succeeded on 3.1.6. Later versions always find several (there the flag is gone).
            # Cube-cube and cube-table pairs have their own collider and are unaffected.
            self.model.opt.enableflags |= mujoco.mjtEnableBit.mjENBL_MULTICCD
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
        self._dis_qpos = [self.model.jnt_qposadr[name(mujoco.mjtObj.mjOBJ_JOINT, f"dis{k}")]
                          for k in range(len(DISTRACTORS))]
        self._dis_geom = [name(mujoco.mjtObj.mjOBJ_GEOM, f"dis{k}") for k in range(len(DISTRACTORS))]
        self._table = name(mujoco.mjtObj.mjOBJ_GEOM, "table")
        self._bg = {g: name(mujoco.mjtObj.mjOBJ_GEOM, f"bg_{g}") for g in ("wall", "floor")}
        self._sun = name(mujoco.mjtObj.mjOBJ_LIGHT, "sun")
        self._primary = name(mujoco.mjtObj.mjOBJ_CAMERA, "primary")
        self._material = lambda n: name(mujoco.mjtObj.mjOBJ_MATERIAL, n)  # noqa: E731
        self._geom_types = {"box": mujoco.mjtGeom.mjGEOM_BOX, "cylinder": mujoco.mjtGeom.mjGEOM_CYLINDER,
                            "sphere": mujoco.mjtGeom.mjGEOM_SPHERE}
        # Every model array a variant writes, as compiled: `reset` restores them all before applying a
        # variant, so no variant outlives its episode.
        self._defaults = {a: getattr(self.model, a).copy() for a in _PERTURBED_ARRAYS}
        self._distractors: list[str] = []
        self._task = None
        self._goal: dict[str, str] = {}
        self._instruction = ""
        self._object_names: list[str] = []
        self._object_shapes: list[str] = []
        self._pads: dict[str, Pad] = {}
        self._visible: list[int] = list(range(N_OBJECTS))
        self._held: int | None = None
        self._closed = False

    # -- episode ---------------------------------------------------------------------------
    def reset(self, task: str, seed: int, perturbation: str | None = None) -> Observation:
        variant = check_variant(perturbation)
        spec = get_task(task)
        mj, m, d = self._mj, self.model, self.data
        # The base scene: always the same draws from the seed's own generator, whatever the variant.
        rng = np.random.default_rng(seed)
        obj_colours = [list(OBJECT_COLOURS)[i] for i in rng.choice(len(OBJECT_COLOURS), N_OBJECTS, replace=False)]
        palette = self.pad_palette
        pad_colours = [palette[i] for i in rng.choice(len(palette), N_PADS, replace=False)]
        pad_xy = _sample_apart(rng, N_PADS, MIN_PAD_GAP, [], "pads")
        if self.pad_at is not None:  # one pad is shown (pads=1): whichever the goal names sits there
            pad_xy = [self.pad_at.copy() for _ in pad_xy]
        obj_xy = _sample_apart(rng, N_OBJECTS, MIN_OBJECT_GAP, [(c, PAD_CLEARANCE) for c in pad_xy], "cubes")
        obj_yaw = rng.uniform(-np.pi / 4, np.pi / 4, N_OBJECTS)
        goal = spec.sample_goal(rng, obj_colours, pad_colours)
        # The variant's own parameters: a second generator seeded by (seed, variant).
        vrng = np.random.default_rng([seed, VARIANTS.index(variant)])
        names, rgbs, shapes = list(obj_colours), [OBJECT_COLOURS[c] for c in obj_colours], ["box"] * N_OBJECTS
        if variant == NOVEL_OBJECTS:
            names, rgbs, shapes, obj_xy = self._novel_objects(vrng, spec.name, goal, obj_colours, pad_xy)
            goal = {slot: names[obj_colours.index(v)] if v in obj_colours else v for slot, v in goal.items()}
            nouns = {slot: NOVEL_SHAPES[shapes[names.index(v)]] for slot, v in goal.items() if v in names}
            instruction = spec.instruction(goal, rng, nouns)
        else:
            instruction = spec.instruction(goal, rng)
        if variant == PARAPHRASE:
            instruction = spec.paraphrase(goal, vrng)
        if self.object_at is not None:  # objects=1: the goal's cube is the one shown
            spot = np.random.default_rng([seed, OBJECT_AT_STREAM]).integers(len(self.object_at))
            obj_xy = list(obj_xy)
            obj_xy[names.index(goal["object"])] = self.object_at[int(spot)].copy()
        self._goal, self._instruction = goal, instruction
        visible = self._shown(names, goal, N_OBJECTS, self.n_objects, f"task {task!r}", "objects")
        shown_pads = self._shown(pad_colours, goal, N_PADS, self.n_pads, f"task {task!r}", "pads")

        for a, value in self._defaults.items():  # undo whatever the previous episode's variant changed
            getattr(m, a)[:] = value
        mj.mj_resetData(m, d)  # also puts every distractor back on its shelf (its compiled pose)
        for i in range(N_OBJECTS):
            g = self._obj_geom[i]
            m.geom_rgba[g, :3] = rgbs[i]
            m.geom_type[g] = self._geom_types[shapes[i]]
            if shapes[i] == "sphere":
                m.geom_condim[g] = 6
                m.geom_friction[g] = SPHERE_FRICTION
            adr = self._obj_qpos[i]
            if i in visible:
                d.qpos[adr:adr + 3] = [*obj_xy[i], TABLE_Z + OBJECT_HALF]
                d.qpos[adr + 3:adr + 7] = _quat_from_rpy(np.array([0.0, 0.0, obj_yaw[i]]))
            else:  # on the shelf under the table, clear of the parked distractors
                d.qpos[adr:adr + 3] = [-0.24 + 0.16 * i, 0.07, PARK_Z + 0.01 + OBJECT_HALF]
        for i, colour in enumerate(pad_colours):
            m.geom_rgba[self._pad_geom[i], :3] = PAD_COLOURS[colour]
            m.geom_pos[self._pad_geom[i], :2] = pad_xy[i]
            if i not in shown_pads:
                m.geom_pos[self._pad_geom[i]] = BG_HIDDEN_POS
        self._distractors = []
        if variant == "distractors":
            self._place_distractors(vrng, goal, names, obj_colours, obj_xy, pad_colours, pad_xy)
        elif variant in ("table_colour", "table_texture", "lighting", "camera_shift", "background"):
            getattr(self, f"_{variant}")(vrng)
        d.qpos[self._fingers] = FINGER_OPEN
        d.ctrl[:] = FINGER_OPEN
        d.mocap_pos[0] = HOME
        d.mocap_quat[0] = [1, 0, 0, 0]
        self._task, self._object_names, self._object_shapes, self._visible = spec, names, shapes, visible
        self._pads = {c: Pad(c, np.array(xy), PAD_HALF) for i, (c, xy) in enumerate(zip(pad_colours, pad_xy))
                      if i in shown_pads}
        self._held, self._closed = None, False
        for _ in range(5 * self._substeps):  # let contacts settle before the first observation
            mj.mj_step(m, d)
        return self._observe()

    @staticmethod
    def _shown(names: list[str], goal: dict[str, str], total: int, count: int, where: str, what: str) -> list[int]:
        """Indices of the `count` of `total` things shown: the goal's first, then the others in order."""
        if count >= total:
            return list(range(total))
        needed = [names.index(v) for v in goal.values() if v in names]
        if len(needed) > count:
            raise ConfigError(f"{where} needs {len(needed)} {what}, but this scene shows {count} ({what}={count})")
        return sorted(needed + [i for i in range(total) if i not in needed][:count - len(needed)])

    # -- perturbation variants (each draws only from its own generator `rng`) --------------------
    def _novel_objects(self, rng: np.random.Generator, task: str, goal: dict[str, str], obj_colours: list[str],
                       pad_xy: list[np.ndarray]) -> tuple[list[str], list, list[str], list[np.ndarray]]:
        """Unseen colours, shapes (cylinders and spheres of the cubes' size) and positions (in the band
        around the training area). The object a push pushes is a sphere (the closed fingers' corner pushed
        cylinders sideways: 75 of 100 pushes succeeded) and the base of a stack a cylinder (nothing rests
        on a sphere)."""
        names = [list(NOVEL_COLOURS)[i] for i in rng.choice(len(NOVEL_COLOURS), N_OBJECTS, replace=False)]
        shapes = [list(NOVEL_SHAPES)[i] for i in rng.integers(len(NOVEL_SHAPES), size=N_OBJECTS)]
        if task == "push":
            shapes[obj_colours.index(goal["object"])] = "sphere"
        elif task == "stack":
            shapes[obj_colours.index(goal["target"])] = "cylinder"
        xy = _sample_apart(rng, N_OBJECTS, MIN_OBJECT_GAP, [(c, PAD_CLEARANCE) for c in pad_xy], "novel objects",
                           NOVEL_LOW, NOVEL_HIGH, lambda p: not _in_training_area(p) and _in_primary_view(p))
        return names, [NOVEL_COLOURS[n] for n in names], shapes, xy

    def _place_distractors(self, rng: np.random.Generator, goal: dict[str, str], names: list[str],
                           obj_colours: list[str], obj_xy: list[np.ndarray], pad_colours: list[str],
                           pad_xy: list[np.ndarray]) -> None:
        """Two or three of the distractor props (can, box, disc) on the table, in training colours that no
        task object of the episode has, clear of every task object, pad and the goal object's path to its
        target; a prop with no room left (rare) stays on its shelf."""
        n = int(rng.integers(2, len(DISTRACTORS) + 1))
        chosen = sorted(int(k) for k in rng.permutation(len(DISTRACTORS))[:n])
        spare = [c for c in OBJECT_COLOURS if c not in obj_colours]
        start = obj_xy[names.index(goal["object"])]
        target = goal["target"]
        end = pad_xy[pad_colours.index(target)] if target in pad_colours else obj_xy[names.index(target)]
        # The path starts behind the object (where a push begins).
        back = start - (end - start) / max(float(np.linalg.norm(end - start)), 1e-9) * 0.09
        avoid = [(c, DISTRACTOR_OBJECT_GAP) for c in obj_xy] + [(c, PAD_CLEARANCE + 0.02) for c in pad_xy]
        m, d = self.model, self.data
        placed: list[np.ndarray] = []
        for k in chosen:
            colour = spare[int(rng.integers(len(spare)))]
            yaw = rng.uniform(-np.pi, np.pi)
            try:
                (xy,) = _sample_apart(rng, 1, 0.0, avoid + [(q, DISTRACTOR_GAP) for q in placed], "distractors",
                                      DISTRACTOR_LOW, DISTRACTOR_HIGH,
                                      lambda p: _segment_distance(p, back, end) >= DISTRACTOR_PATH_GAP
                                      and _in_primary_view(p))
            except RuntimeError:
                continue
            placed.append(xy)
            _, kind, size = DISTRACTORS[k]
            m.geom_rgba[self._dis_geom[k], :3] = OBJECT_COLOURS[colour]
            adr = self._dis_qpos[k]
            d.qpos[adr:adr + 3] = [*xy, TABLE_Z + (size[1] if kind == "cylinder" else size[2])]
            d.qpos[adr + 3:adr + 7] = _quat_from_rpy(np.array([0.0, 0.0, yaw]))
            self._distractors.append(DISTRACTORS[k][0])

    def _table_colour(self, rng: np.random.Generator) -> None:
        """A uniformly drawn hue, saturation in [0.25, 0.8], value in [0.35, 0.9], at least 0.2 (RGB
        distance) away from the training table's colour (`table_rgb`)."""
        while True:
            rgb = _random_colour(rng, (0.25, 0.8), (0.35, 0.9))
            if np.linalg.norm(rgb - np.asarray(self.table_rgb)) >= 0.2:
                break
        self.model.geom_rgba[self._table, :3] = rgb

    def _table_texture(self, rng: np.random.Generator) -> None:
        """One of TABLE_TEXTURES (fine or large checker, grid lines, noise, gradient) tinted by a colour of
        uniform hue, saturation in [0, 0.5] and value in [0.6, 1]."""
        texture = TABLE_TEXTURES[int(rng.integers(len(TABLE_TEXTURES)))]
        self.model.geom_matid[self._table] = self._material(f"table_{texture}")
        self.model.geom_rgba[self._table, :3] = _random_colour(rng, (0.0, 0.5), (0.6, 1.0))

    def _lighting(self, rng: np.random.Generator) -> None:
        """The sun (the scene's one light; the headlight is unchanged): diffuse intensity times a factor in
        LIGHT_SCALE, direction tilted by LIGHT_TILT from vertical towards a uniform azimuth."""
        m, sun = self.model, self._sun
        m.light_diffuse[sun] = self._defaults["light_diffuse"][sun] * rng.uniform(*LIGHT_SCALE)
        tilt, azimuth = rng.uniform(*LIGHT_TILT), rng.uniform(0, 2 * np.pi)
        m.light_dir[sun] = [np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), -np.cos(tilt)]
        m.light_pos[sun] = -1.5 * m.light_dir[sun]

    def _camera_shift(self, rng: np.random.Generator) -> None:
        """The primary camera moved by up to CAMERA_SHIFT per world axis and turned by up to CAMERA_TURN about
        each of its own axes (the wrist camera is unchanged)."""
        m, cam = self.model, self._primary
        m.cam_pos[cam] = self._defaults["cam_pos"][cam] + rng.uniform(-CAMERA_SHIFT, CAMERA_SHIFT, 3)
        turn = _quat_from_rpy(rng.uniform(-CAMERA_TURN, CAMERA_TURN, 3))
        q = _quat_mul(self._defaults["cam_quat"][cam], turn)
        m.cam_quat[cam] = q / np.linalg.norm(q)

    def _background(self, rng: np.random.Generator) -> None:
        """A back wall and a floor around the table (hidden far below otherwise), in a colour of uniform hue,
        saturation in [0.2, 0.9], value in [0.3, 1], plain or with one of BACKGROUND_TEXTURES."""
        m = self.model
        m.geom_pos[self._bg["wall"]] = BG_WALL_POS
        m.geom_pos[self._bg["floor"]] = BG_FLOOR_POS
        rgb = _random_colour(rng, (0.2, 0.9), (0.3, 1.0))
        texture = BACKGROUND_TEXTURES[int(rng.integers(len(BACKGROUND_TEXTURES)))]
        for g in self._bg.values():
            m.geom_rgba[g, :3] = rgb
            m.geom_matid[g] = -1 if texture is None else self._material(f"bg_{texture}")

    def step(self, action: np.ndarray) -> Observation:
        if self._task is None:
            raise RuntimeError("step() before reset()")
        a = check_action(action)
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

    def scene(self) -> SceneView:
        d = self.data
        return SceneView(
            objects={n: d.xpos[self._obj_body[i]].copy() for i, n in enumerate(self._object_names)
                     if i in self._visible},
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
