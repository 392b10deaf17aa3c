"""Perturbation suites of the built-in MuJoCo tabletop (names only; the backend applies them).

A variant is a name. Everything a variant changes is drawn from its own
generator, seeded by (episode seed, variant), so the unperturbed scene of
the same seed (objects, placements, goal, instruction) is unchanged and the
variant changes only what it names: pixels for the visual variants, the
instruction for `paraphrase`, the objects for `novel_objects`.

Suites (SimplerEnv-style "variant aggregation": a suite's score is the
mean of its variants' success rates):
- in_distribution: the unperturbed task.
- visual: table_colour, table_texture, lighting, distractors, camera_shift,
  background; each is also a suite of its own.
- novel_objects: unseen colours, shapes and positions.
- language: instructions from templates held out of training.
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
