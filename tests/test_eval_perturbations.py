"""Perturbation variants of the built-in MuJoCo tabletop: each changes what it names (pixels, the
instruction, or the objects) and nothing else, deterministically per (seed, variant), never leaks into the
next episode, and the scripted experts still solve the tasks under it."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless offscreen rendering (llvmpipe)

import itertools

import numpy as np
import pytest

from vla_scale.errors import ConfigError
from vla_scale.eval.backend import UNPERTURBED
from vla_scale.eval.experts import run_expert
from vla_scale.eval.mujoco_backend import (AREA_HIGH, AREA_LOW, NOVEL_COLOURS, NOVEL_SHAPES, OBJECT_COLOURS,
                                           PAD_COLOURS, MujocoBackend)
from vla_scale.eval.perturbations import NOVEL_OBJECTS, PARAPHRASE, SUITES, VARIANTS, VISUAL, check_variant
from vla_scale.eval.tasks import COLOUR_SYNONYMS, TASKS

SEEDS = range(20)


@pytest.fixture(scope="module")
def physics():
    with MujocoBackend(cameras=()) as backend:
        yield backend


@pytest.fixture(scope="module")
def rendered():
    with MujocoBackend(cameras=("primary", "wrist"), image_size=128) as backend:
        yield backend


def _snapshot(backend, obs):
    view = backend.scene()
    return {"obs": obs, "objects": view.objects, "pads": {n: p.center for n, p in view.pads.items()},
            "goal": view.goal, "distractors": list(backend._distractors)}


def _variant_params(backend):
    """Every model value a visual variant may change, outside the task objects and pads."""
    m, d = backend.model, backend.data
    geoms = [backend._table, *backend._bg.values(), *backend._dis_geom]
    qpos = np.concatenate([d.qpos[a:a + 3] for a in backend._dis_qpos])
    return np.concatenate([m.geom_rgba[geoms].ravel(), m.geom_matid[geoms], m.geom_pos[geoms].ravel(),
                           m.light_diffuse.ravel(), m.light_dir.ravel(), m.cam_pos.ravel(), m.cam_quat.ravel(),
                           np.round(qpos, 3)])


def test_variant_names_and_suites_are_the_fixed_ones():
    assert VISUAL == ("table_colour", "table_texture", "lighting", "distractors", "camera_shift", "background")
    assert VARIANTS == (UNPERTURBED, *VISUAL, NOVEL_OBJECTS, PARAPHRASE)
    assert SUITES["visual"] == VISUAL and SUITES["language"] == (PARAPHRASE,)
    assert all(SUITES[v] == (v,) for v in VISUAL) and SUITES["novel_objects"] == (NOVEL_OBJECTS,)
    episodes = MujocoBackend.plan("visual", ["stack"], 2, seed=5)
    assert [(e.variant, e.seed) for e in episodes] == [(v, s) for v in VISUAL for s in (5, 6)]


@pytest.mark.parametrize("variant", VISUAL)
def test_a_visual_variant_changes_only_pixels_deterministically(rendered, variant):
    for task, seed in (("pick_place", 3), ("stack", 8)):
        base = _snapshot(rendered, rendered.reset(task, seed))
        base_params = _variant_params(rendered)
        pert = _snapshot(rendered, rendered.reset(task, seed, variant))
        params = _variant_params(rendered)
        # Nothing but pixels changes: instruction, proprioception, goal, pads, task objects (names and places).
        assert pert["obs"].instruction == base["obs"].instruction
        np.testing.assert_array_equal(pert["obs"].state, base["obs"].state)
        assert pert["goal"] == base["goal"]
        assert pert["objects"].keys() == base["objects"].keys()
        for name, centre in base["objects"].items():
            np.testing.assert_allclose(pert["objects"][name], centre, atol=1e-6)
        for name, centre in base["pads"].items():
            np.testing.assert_array_equal(pert["pads"][name], centre)
        assert not np.array_equal(pert["obs"].images["primary"], base["obs"].images["primary"])
        assert not np.array_equal(params, base_params)
        if variant == "camera_shift":  # the wrist camera is not moved
            np.testing.assert_array_equal(pert["obs"].images["wrist"], base["obs"].images["wrist"])
        if variant == "distractors":
            assert 1 <= len(pert["distractors"]) <= 3
        else:
            assert pert["distractors"] == []
        # The same (task, seed, variant) again: the same pixels; another seed: another perturbation.
        again = rendered.reset(task, seed, variant)
        for cam in ("primary", "wrist"):
            np.testing.assert_array_equal(again.images[cam], pert["obs"].images[cam])
        other = rendered.reset(task, seed + 1, variant)
        assert not np.array_equal(_variant_params(rendered), params)
        assert not np.array_equal(other.images["primary"], pert["obs"].images["primary"])


def test_no_variant_leaks_into_the_next_episode(rendered):
    with MujocoBackend(cameras=("primary", "wrist"), image_size=128) as fresh:
        clean = fresh.reset("move_near", 2)
        clean_params = _variant_params(fresh)
        defaults = {a: getattr(fresh.model, a).copy() for a in fresh._defaults}
    for variant in VARIANTS:
        rendered.reset("move_near", 2, variant)
        obs = rendered.reset("move_near", 2)
        assert obs.instruction == clean.instruction, variant
        np.testing.assert_array_equal(obs.state, clean.state)
        for cam in ("primary", "wrist"):
            np.testing.assert_array_equal(obs.images[cam], clean.images[cam], err_msg=variant)
        np.testing.assert_array_equal(_variant_params(rendered), clean_params)
        for a, value in defaults.items():
            np.testing.assert_array_equal(getattr(rendered.model, a), value, err_msg=f"{variant}: {a}")


def test_distractors_are_apart_from_the_task_and_never_task_objects(physics):
    for seed in range(10):
        physics.reset("push", seed, "distractors")
        view = physics.scene()
        assert set(view.objects) <= set(OBJECT_COLOURS) and len(view.objects) == 4
        task_colours = {tuple(np.round(physics.model.geom_rgba[g, :3], 4)) for g in physics._obj_geom}
        on_table = 0
        for k, geom in enumerate(physics._dis_geom):
            xyz = physics.data.qpos[physics._dis_qpos[k]:physics._dis_qpos[k] + 3]
            if xyz[2] < 0:  # parked under the table
                continue
            on_table += 1
            assert tuple(np.round(physics.model.geom_rgba[geom, :3], 4)) not in task_colours
            for centre in view.objects.values():
                assert np.linalg.norm(xyz[:2] - centre[:2]) > 0.13
            for pad in view.pads.values():
                assert np.linalg.norm(xyz[:2] - pad.center) > 0.1
        assert on_table == len(physics._distractors) >= 1


def test_paraphrase_changes_only_the_instruction_to_a_held_out_one(rendered):
    for task in TASKS:
        seen = set()
        for seed in range(8):
            base = rendered.reset(task, seed)
            goal = rendered.scene().goal
            para = rendered.reset(task, seed, PARAPHRASE)
            assert rendered.scene().goal == goal
            np.testing.assert_array_equal(para.state, base.state)
            for cam in ("primary", "wrist"):
                np.testing.assert_array_equal(para.images[cam], base.images[cam])
            assert para.instruction != base.instruction
            assert para.instruction not in {t.format(**goal) for t in TASKS[task].templates}
            assert rendered.reset(task, seed, PARAPHRASE).instruction == para.instruction
            seen.add(para.instruction)
        assert len(seen) > 1  # the templates and synonyms vary with the seed


def test_no_paraphrase_equals_a_training_instruction_for_any_goal():
    colours = [*OBJECT_COLOURS, *PAD_COLOURS]
    for task in TASKS.values():
        assert task.paraphrases and not set(task.paraphrases) & set(task.templates)
        for a, b in itertools.permutations(colours, 2):
            goal = {"object": a, "target": b}
            trained = {t.format(**goal) for t in task.templates}
            for template in task.paraphrases:
                for oa, ob in itertools.product((a, *COLOUR_SYNONYMS[a]), (b, *COLOUR_SYNONYMS[b])):
                    assert template.format(object=oa, target=ob) not in trained
    assert not set(itertools.chain(*COLOUR_SYNONYMS.values())) & set(colours)


def test_novel_objects_are_unseen_colours_shapes_and_places_named_by_the_instruction(rendered):
    for task in TASKS:
        for seed in range(5):
            base = rendered.reset(task, seed)
            base_pads = {n: p.center for n, p in rendered.scene().pads.items()}
            obs = rendered.reset(task, seed, NOVEL_OBJECTS)
            view = rendered.scene()
            assert set(view.objects) <= set(NOVEL_COLOURS) and not set(view.objects) & set(OBJECT_COLOURS)
            shapes = dict(zip(view.objects, rendered._object_shapes))
            assert set(shapes.values()) <= set(NOVEL_SHAPES)
            for g, shape in zip(rendered._obj_geom, rendered._object_shapes):
                assert int(rendered.model.geom_type[g]) == int(rendered._geom_types[shape])
            for centre in view.objects.values():
                assert np.any(centre[:2] < AREA_LOW) or np.any(centre[:2] > AREA_HIGH)
                assert np.all(np.abs(centre[:2]) < 0.25)
            assert {n: p.center for n, p in view.pads.items()}.keys() == base_pads.keys()
            obj = view.goal["object"]
            assert f"{obj} {NOVEL_SHAPES[shapes[obj]]}" in obs.instruction
            assert obs.instruction != base.instruction
            assert not rendered.success()
            np.testing.assert_array_equal(rendered.reset(task, seed, NOVEL_OBJECTS).images["primary"],
                                          obs.images["primary"])


@pytest.mark.parametrize("variant", ["distractors", "camera_shift", NOVEL_OBJECTS])
def test_experts_still_succeed_under_physical_and_camera_variants(physics, variant):
    rates = {}
    for task in TASKS:
        lasting = []
        for seed in SEEDS:
            ok = run_expert(physics, task, seed, variant=variant)
            for _ in range(10):
                physics.step(np.zeros(7))
            lasting.append(ok and physics.success())
        rates[task] = float(np.mean(lasting))
    assert min(rates.values()) >= 0.9, rates


def test_the_backend_expert_hook_works_under_a_variant(physics):
    physics.reset("stack", 4, NOVEL_OBJECTS)
    expert = physics.expert()
    for _ in range(TASKS["stack"].episode_length):
        action, done = expert.act()
        if done:
            break
        physics.step(action)
    assert physics.success()


def test_unknown_variants_are_config_errors(physics):
    with pytest.raises(ConfigError, match="unknown perturbation variant 'fog'"):
        physics.reset("pick_place", 0, "fog")
    with pytest.raises(ConfigError, match="unknown perturbation variant"):
        check_variant("Table_Colour")
    assert check_variant(None) == UNPERTURBED
