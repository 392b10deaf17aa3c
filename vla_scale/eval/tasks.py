"""Evaluation tasks, independent of any simulator.

A task is a name, instruction templates, an episode length, a way to pick
its slots (which object, which target) from a seeded generator, and a
success predicate written only in terms of the geometry in `SceneView`
(object centres, pads, table height, what the gripper holds). Backends
build the scene; tasks judge it.

This module must never import a simulator or read pixels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from vla_scale.errors import ConfigError
from vla_scale.eval.backend import Backend, Expert, SceneView

# An object counts as resting when its centre is within this of its resting height
# (objects are cubes; a settled cube sits at table_z + half, contacts allow ~1 mm of penetration).
REST_TOL = 0.01
NEAR_DISTANCE = 0.08  # metres between centres: about two cube widths, never touching the target required


def _resting_on(view: SceneView, name: str, surface_z: float) -> bool:
    return abs(view.objects[name][2] - (surface_z + view.object_half)) < REST_TOL and view.held != name


def _on_pad(view: SceneView) -> bool:
    obj, pad = view.goal["object"], view.pads[view.goal["target"]]
    xy = view.objects[obj][:2]
    return bool(np.all(np.abs(xy - pad.center) <= pad.half)) and _resting_on(view, obj, view.table_z)


def _near(view: SceneView) -> bool:
    obj, other = view.goal["object"], view.goal["target"]
    d = float(np.linalg.norm(view.objects[obj][:2] - view.objects[other][:2]))
    return d < NEAR_DISTANCE and _resting_on(view, obj, view.table_z) and _resting_on(view, other, view.table_z)


def _stacked(view: SceneView) -> bool:
    obj, base = view.goal["object"], view.goal["target"]
    top, bottom = view.objects[obj], view.objects[base]
    aligned = bool(np.all(np.abs(top[:2] - bottom[:2]) < view.object_half))
    return aligned and _resting_on(view, base, view.table_z) and _resting_on(view, obj, bottom[2] + view.object_half)


def _object_and_pad(rng: np.random.Generator, objects: Sequence[str], pads: Sequence[str]) -> dict[str, str]:
    return {"object": str(rng.choice(objects)), "target": str(rng.choice(pads))}


def _two_objects(rng: np.random.Generator, objects: Sequence[str], pads: Sequence[str]) -> dict[str, str]:
    a, b = rng.choice(len(objects), size=2, replace=False)
    return {"object": objects[int(a)], "target": objects[int(b)]}


# Held-out synonyms for the `paraphrase` variant (language suite): never used by a training template.
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"), "green": ("emerald",), "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon"), "purple": ("violet",), "orange": ("amber", "tangerine"),
    "white": ("ivory", "snow white"), "black": ("ebony", "jet black"), "grey": ("silver", "ash grey")}
# The object noun after a slot in a training template ("the {object} block"), replaced by the shape's noun
# for objects that are not cubes (novel_objects).
_OBJECT_NOUN = re.compile(r"\{(object|target)\} (block|cube)\b")


@dataclass(frozen=True)
class Task:
    name: str
    templates: tuple[str, ...]  # str.format templates over the goal slots (the training instructions)
    episode_length: int  # control steps
    sample_goal: Callable[[np.random.Generator, Sequence[str], Sequence[str]], dict[str, str]]
    predicate: Callable[[SceneView], bool]
    # Held-out templates (the language suite): other verbs and nouns ("mat", "square", "box"), never a
    # training template, so no paraphrase equals a training instruction for any goal.
    paraphrases: tuple[str, ...] = ()

    def instruction(self, goal: dict[str, str], rng: np.random.Generator,
                    nouns: Mapping[str, str] | None = None) -> str:
        """A training template (one draw from `rng`) filled with the goal; `nouns` (slot -> noun, e.g.
        {"object": "cylinder"}) replaces the template's "block"/"cube" after that slot."""
        template = self.templates[int(rng.integers(len(self.templates)))]
        if nouns:
            template = _OBJECT_NOUN.sub(lambda m: f"{{{m[1]}}} {nouns.get(m[1], m[2])}", template)
        return template.format(**goal)

    def paraphrase(self, goal: dict[str, str], rng: np.random.Generator) -> str:
        """A held-out template filled with the goal, each colour replaced by a held-out synonym with
        probability 1/2 (draws from `rng`: the template, then per slot in sorted order a coin and a synonym)."""
        template = self.paraphrases[int(rng.integers(len(self.paraphrases)))]
        words = {}
        for slot in sorted(goal):
            word = goal[slot]
            synonyms = COLOUR_SYNONYMS.get(word, ())
            if rng.random() < 0.5 and synonyms:
                word = synonyms[int(rng.integers(len(synonyms)))]
            words[slot] = word
        return template.format(**words)

    def success(self, view: SceneView) -> bool:
        return bool(self.predicate(view))


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("pick_place",
         ("pick up the {object} block and place it on the {target} pad",
          "put the {object} block on the {target} pad",
          "move the {object} cube onto the {target} pad"),
         200, _object_and_pad, _on_pad,
         ("place the {object} cube onto the {target} mat",
          "grab the {object} box and set it down on the {target} mat",
          "lift the {object} cube and drop it onto the {target} square")),
    Task("push",
         ("push the {object} block into the {target} area",
          "slide the {object} cube onto the {target} pad"),
         200, _object_and_pad, _on_pad,
         ("shove the {object} cube over to the {target} mat",
          "nudge the {object} box across the table onto the {target} square")),
    Task("move_near",
         ("move the {object} block next to the {target} block",
          "put the {object} cube near the {target} cube"),
         200, _two_objects, _near,
         ("place the {object} cube beside the {target} box",
          "set the {object} box down close to the {target} cube")),
    Task("stack",
         ("stack the {object} block on top of the {target} block",
          "put the {object} cube on the {target} cube"),
         200, _two_objects, _stacked,
         ("place the {object} cube on top of the {target} box",
          "set the {object} box onto the {target} cube so it rests there")),
)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown evaluation task {name!r}; built-in tasks: {', '.join(TASKS)}") from None


class TabletopBackend(Backend):
    """The built-in tabletop in any simulator (MuJoCo, Isaac Gym): this module's tasks and
    `perturbations.SUITES`, success judged on `scene()` by the task's predicate, the scripted experts.
    Subclasses set `self._task` in `reset`."""

    _task: Task | None = None

    @classmethod
    def suites(cls) -> dict[str, tuple[str, ...]]:
        from vla_scale.eval.perturbations import SUITES

        return dict(SUITES)

    @classmethod
    def tasks(cls, suite: str) -> tuple[str, ...]:
        return tuple(TASKS)

    @classmethod
    def episode_length(cls, task: str) -> int:
        return get_task(task).episode_length

    def expert(self) -> Expert:
        from vla_scale.eval.experts import SceneExpert

        if self._task is None:
            raise RuntimeError("expert() before reset()")
        return SceneExpert(self, self._task.name)

    def success(self) -> bool:
        if self._task is None:
            raise RuntimeError("success() before reset()")
        return self._task.success(self.scene())

