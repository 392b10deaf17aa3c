"""Perturbation suites of the built-in MuJoCo tabletop (the names; `mujoco_backend` applies them).

A variant is a name. The base scene of (task, seed) is always drawn the
same way from `numpy.random.default_rng(seed)` (object colours, pad
colours, placements, yaws, goal, training instruction), whatever the
variant. Everything the variant itself changes is drawn from a second
generator, `default_rng([seed, VARIANTS.index(variant)])`, so a
(task, seed, variant) triple always gives the same episode and pixels, and
the variant changes only what it names. Every reset first restores every
model value any variant writes, so no variant outlives its episode.

Variants (ranges are those `mujoco_backend` draws from):
- none (UNPERTURBED): the training distribution.
- table_colour: the table's colour: uniform hue, saturation in [0.25, 0.8],
  value in [0.35, 0.9], at least 0.2 (RGB distance) from the training
  table's brown.
- table_texture: the table gets one of five textures (fine checker, large
  checker, grid lines, noise, gradient; declared in the model as builtin
  textures) tinted by a colour of uniform hue, saturation in [0, 0.5] and
  value in [0.6, 1].
- lighting: the scene's one light (a directional "sun"; the headlight is
  unchanged) has its diffuse intensity scaled by a factor in [0.4, 1.25]
  and its direction tilted 15-45 degrees from vertical towards a uniform
  azimuth.
- distractors: two or three props (a can, a flat box, a disc; physical,
  movable, never graspable, never in `scene().objects` or an instruction)
  on the table in training object colours that no task object of the
  episode has, at least 14 cm from every task object's centre, clear of
  the pads and at least 10 cm from the straight path of the goal object
  to its target. Unused props rest on a shelf under the table.
- camera_shift: the primary camera moves by up to 2 cm along each world
  axis and turns by up to 2.5 degrees about each of its own axes (the
  wrist camera is unchanged).
- background: a back wall and floor appear around the table (the training
  background is the renderer's black), in a colour of uniform hue,
  saturation in [0.2, 0.9], value in [0.3, 1], plain or with a checker,
  grid or gradient texture.
- novel_objects: the four objects get colours no training scene has
  (cyan, magenta, pink, brown, teal, olive), shapes other than cubes
  (cylinders and spheres of the cubes' size: radius 2 cm, height 4 cm; the
  object a push pushes is a sphere and the base of a stack a cylinder) and
  positions outside the training placement area (x in [-0.23, 0.22],
  y in [-0.23, 0.23] minus the training area, in the primary camera's
  view). Pads, the goal's slots and the template are the base scene's;
  the instruction names the new colours and shapes ("move the teal ball
  onto the white pad").
- paraphrase: the instruction comes from held-out templates (`Task.paraphrases`:
  other verbs and nouns, "mat" and "square" for pads) with each colour
  replaced by a held-out synonym ("crimson" for red) with probability 1/2;
  pixels, state and scene are those of the unperturbed episode.

Suites (SimplerEnv-style "variant aggregation": a suite's score is the
mean of its variants' success rates):
- in_distribution: the unperturbed task.
- visual: table_colour, table_texture, lighting, distractors, camera_shift,
  background; each is also a suite of its own.
- novel_objects: unseen colours, shapes and positions.
- language: paraphrase (instructions from templates held out of training).
"""
from __future__ import annotations

from vla_scale.errors import ConfigError
from vla_scale.eval.backend import UNPERTURBED

VISUAL = ("table_colour", "table_texture", "lighting", "distractors", "camera_shift", "background")
NOVEL_OBJECTS = "novel_objects"
PARAPHRASE = "paraphrase"
VARIANTS = (UNPERTURBED, *VISUAL, NOVEL_OBJECTS, PARAPHRASE)

SUITES: dict[str, tuple[str, ...]] = {
    "in_distribution": (UNPERTURBED,),
    "visual": VISUAL,
    **{v: (v,) for v in VISUAL},
    "novel_objects": (NOVEL_OBJECTS,),
    "language": (PARAPHRASE,),
}


def check_variant(variant: str | None) -> str:
    """The variant's name (None means UNPERTURBED); an unknown name is a ConfigError listing the known ones."""
    name = UNPERTURBED if variant is None else variant
    if name not in VARIANTS:
        raise ConfigError(f"unknown perturbation variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return name
