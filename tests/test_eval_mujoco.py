"""The built-in MuJoCo tabletop: experts solve every task, resets are deterministic to the pixel,
offscreen rendering works, and expert demonstrations become readable robot shards with statistics."""
import os
from dataclasses import replace

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless offscreen rendering (llvmpipe)

import numpy as np
import pytest

from streaming_helpers import read_plain  # noqa: F401  (fixture)
from vla_scale.data.camera_images import decode_camera_image
from vla_scale.data.stats import stats_for_shards
from vla_scale.errors import ConfigError
from vla_scale.eval.backend import Backend
from vla_scale.eval.experts import run_expert, write_demonstrations
from vla_scale.eval.mujoco_backend import MAX_TRANSLATION, MujocoBackend
from vla_scale.eval.tasks import TASKS

SEEDS = range(20)


@pytest.fixture(scope="module")
def physics():
    with MujocoBackend(cameras=()) as backend:
        yield backend


@pytest.fixture(scope="module")
def rendered():
    with MujocoBackend(cameras=("primary", "wrist"), image_size=128) as backend:
        yield backend


def test_there_are_at_least_four_tasks_and_the_backend_is_a_backend():
    assert {"pick_place", "push", "move_near", "stack"} <= set(TASKS)
    assert issubclass(MujocoBackend, Backend)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_expert_succeeds_on_at_least_95_percent_of_seeds_and_the_success_lasts(physics, task):
    lasting = []
    for seed in SEEDS:
        ok = run_expert(physics, task, seed)
        for _ in range(10):  # a success that falls apart a moment later is not one
            physics.step(np.zeros(7))
        lasting.append(ok and physics.success())
    assert np.mean(lasting) >= 0.95, f"{task}: failed seeds {[s for s, ok in zip(SEEDS, lasting) if not ok]}"


def test_no_task_starts_solved(physics):
    for task in TASKS:
        for seed in SEEDS:
            physics.reset(task, seed)
            assert not physics.success(), (task, seed)


def test_same_seed_same_pixels_and_instruction_different_seed_different(rendered):
    a = rendered.reset("pick_place", 3)
    rendered.reset("stack", 4)  # another episode in between must not leak into the next reset
    b = rendered.reset("pick_place", 3)
    with MujocoBackend(cameras=("primary", "wrist"), image_size=128) as fresh:
        c = fresh.reset("pick_place", 3)
    for other in (b, c):
        assert other.instruction == a.instruction
        np.testing.assert_array_equal(other.state, a.state)
        for cam in ("primary", "wrist"):
            np.testing.assert_array_equal(other.images[cam], a.images[cam])
    d = rendered.reset("pick_place", 4)
    assert not np.array_equal(d.images["primary"], a.images["primary"])


def test_offscreen_rendering_shows_the_scene_and_follows_the_actions_deterministically(rendered):
    obs = rendered.reset("push", 0)
    assert set(obs.images) == {"primary", "wrist"}
    for image in obs.images.values():
        assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
        assert image.std() > 10  # not a blank frame
    actions = [np.array([0.01, -0.01, -0.02, 0, 0, 0.05, float(t > 3)]) for t in range(8)]
    frames = []
    for _ in range(2):
        rendered.reset("push", 0)
        frames.append([rendered.step(a).images["primary"] for a in actions])
    for x, y in zip(*frames):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(frames[0][-1], obs.images["primary"])  # the gripper moved in view
    with MujocoBackend(image_size=224) as big:
        assert big.reset("stack", 1).images["primary"].shape == (224, 224, 3)


def test_actions_are_clipped_to_the_documented_limit(physics):
    start = physics.reset("pick_place", 0).state[:3]
    moved = physics.step(np.array([1.0, -1.0, 0.0, 0, 0, 0, 0])).state[:3]
    np.testing.assert_allclose(moved - start, [MAX_TRANSLATION, -MAX_TRANSLATION, 0.0], atol=1e-6)


def test_bad_requests_are_config_errors_naming_the_problem(physics):
    with pytest.raises(ConfigError, match="unknown perturbation variant .sunset."):
        physics.reset("pick_place", 0, perturbation="sunset")
    with pytest.raises(ConfigError, match="unknown evaluation task 'fly'"):
        physics.reset("fly", 0)
    physics.reset("pick_place", 0)
    with pytest.raises(ConfigError, match="7 finite numbers"):
        physics.step(np.zeros(6))
    with pytest.raises(ConfigError, match="camera"):
        MujocoBackend(cameras=("top",))


def test_demonstrations_become_robot_shards_with_statistics(tmp_path, read_plain):
    out = tmp_path / "demos"
    summary = write_demonstrations(out, "pick_place", episodes=2, seed=0)
    assert summary["episodes"] == 2 and summary["skipped"]["episodes"] == 0
    rows = read_plain(out)
    assert len(rows) == summary["samples"]
    for row in rows:
        image = np.asarray(decode_camera_image(row["image"]))
        assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
        assert row["action"].dtype == np.float32 and row["action"].shape == (7,)
        assert row["action"][6] in (0.0, 1.0)
        assert row["state"].shape == (8,)
        assert row["task"] == "robot" and "pad" in row["instruction"]
    for episode in (0, 1):
        steps = [int(r["step"]) for r in rows if r["episode"] == episode]
        assert steps == list(range(len(steps))) and len(steps) > 20
    # The first frame is the reset observation: the same pixels the backend renders (up to JPEG).
    with MujocoBackend() as backend:
        first = backend.reset("pick_place", 0).images["primary"].astype(int)
    assert np.abs(np.asarray(decode_camera_image(rows[0]["image"])).astype(int) - first).mean() < 3
    stats, path = stats_for_shards(out)
    assert path.exists() and stats["dim"] == 7 and stats["count"] == len(rows)
    assert stats["binary_dims"] == [6] and stats["mask"][6] is False  # the gripper stays raw 0/1
    assert max(stats["max"][:3]) <= MAX_TRANSLATION + 1e-6


def test_importing_triton_after_rendering_does_not_crash():
    """On llvmpipe, triton (imported by streaming and transformers) loaded after a GL context segfaulted."""
    import subprocess
    import sys

    code = ("from vla_scale.eval.mujoco_backend import MujocoBackend\n"
            "b = MujocoBackend(); b.reset('stack', 0)\n"
            "import triton\n"
            "print('alive')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "alive" in run.stdout, run.stderr[-2000:]


def test_a_scene_of_fewer_cubes_and_pads_keeps_the_episode_and_hides_the_rest():
    """`objects=1, pads=1` (the demo's simple scene): the same (task, seed) has the same goal, instruction and
    goal placements as the full scene; only the goal's cube and pad are on the table, the other cubes lie on
    the shelf under it; the expert solves it; a task that needs two cubes is refused by name."""
    with MujocoBackend(cameras=("primary",)) as full, MujocoBackend(cameras=("primary",), objects=1, pads=1) as one:
        solved = 0
        for seed in range(6):
            a, b = full.reset("pick_place", seed), one.reset("pick_place", seed)
            va, vb = full.scene(), one.scene()
            assert a.instruction == b.instruction and va.goal == vb.goal
            assert list(vb.objects) == [vb.goal["object"]] and list(vb.pads) == [vb.goal["target"]]
            np.testing.assert_allclose(vb.objects[vb.goal["object"]], va.objects[va.goal["object"]], atol=1e-6)
            np.testing.assert_array_equal(vb.pads[vb.goal["target"]].center, va.pads[va.goal["target"]].center)
            # Hidden cubes lie on the shelf under the table; the goal cube is where the full scene has it.
            hidden = [i for i, n in enumerate(one._object_names) if n not in vb.objects]
            assert len(hidden) == 3 and all(one.data.xpos[one._obj_body[i]][2] < -0.3 for i in hidden)
            assert not np.array_equal(a.images["primary"], b.images["primary"])
            solved += run_expert(one, "pick_place", seed)
        assert solved == 6
        with pytest.raises(ConfigError, match=r"task 'stack' needs 2 objects.*objects=1"):
            one.reset("stack", 0)
    with MujocoBackend(cameras=(), objects=2) as two:
        two.reset("stack", 0)
        assert set(two.scene().objects) == set(two.scene().goal.values())
    for bad in ({"objects": 0}, {"objects": 5}, {"pads": 3}):
        with pytest.raises(ConfigError, match=f"{next(iter(bad))} must be 1 to"):
            MujocoBackend(cameras=(), **bad)


def test_the_table_colour_is_a_setting_and_pads_stand_out_from_it():
    """`table_rgb` (the demo's grey table): the table renders in it, no pad takes a colour close to it, the
    `table_colour` variant still draws a colour away from it, and the default table keeps all three pads."""
    from vla_scale.eval.mujoco_backend import PAD_COLOURS

    grey = (0.5, 0.5, 0.5)
    with MujocoBackend(cameras=("primary",), table_rgb=grey) as b, MujocoBackend(cameras=("primary",)) as default:
        assert b.pad_palette == ["white", "black"] and default.pad_palette == list(PAD_COLOURS)
        for seed in range(10):
            obs = b.reset("pick_place", seed)
            assert "grey" not in b.scene().pads
            corner = obs.images["primary"][118:126, 2:10].reshape(-1, 3).astype(int)  # the table's near corner
            assert np.ptp(corner.mean(0)) <= 3  # grey: equal channels (lighting scales them alike)
            assert np.ptp(default.reset("pick_place", seed).images["primary"][118:126, 2:10].reshape(-1, 3)
                          .astype(int).mean(0)) > 30  # the default table is brown
            b.reset("pick_place", seed, "table_colour")
            assert np.linalg.norm(b.model.geom_rgba[b._table, :3] - grey) >= 0.2
    for bad in ((0.5, 0.5), (1.5, 0.5, 0.5)):
        with pytest.raises(ConfigError, match="table_rgb must be three numbers"):
            MujocoBackend(cameras=(), table_rgb=bad)


def _episode(backend, seed, noise=0.0):
    """(recorded actions, scene views before each step, success) of one pick_place episode."""
    actions, views = [], []

    def keep(obs, action, t):
        actions.append(action.copy())
        views.append(backend.scene())

    ok = run_expert(backend, "pick_place", seed, keep, noise=noise)
    return np.array(actions), views, ok


def test_dart_noise_moves_the_gripper_off_the_expert_path_but_records_the_experts_own_actions(physics):
    from vla_scale.eval.experts import MAX_STEP, make_expert

    clean, clean_views, _ = _episode(physics, 3)
    noisy, views, ok = _episode(physics, 3, noise=0.006)
    assert ok
    ee = np.array([v.ee_pos for v in views])
    executed = np.diff(ee, axis=0)
    travel = np.linalg.norm(noisy[:-1, :3], axis=1) >= MAX_STEP / 2
    assert travel.sum() > 10
    # The path differs from the recorded moves while travelling, by the noise...
    assert np.abs(executed[travel] - noisy[:-1][travel, :3]).max() > 0.003
    # ...and fine alignment is never perturbed: every short move was executed as recorded.
    assert np.allclose(executed[~travel], noisy[:-1][~travel, :3], atol=1e-9)
    # What was recorded is the expert's own command in the state it saw: a fresh expert shown the same scenes
    # answers the same actions.
    replay = make_expert("pick_place")
    assert np.array_equal(np.array([replay.act(v)[0] for v in views]), noisy)
    # The same seed gives the same episode; without noise the path is another (the expert's own).
    again, again_views, _ = _episode(physics, 3, noise=0.006)
    assert np.array_equal(again, noisy) and all(np.array_equal(a.ee_pos, b.ee_pos) for a, b in zip(again_views, views))
    assert len(clean) != len(noisy) or not np.array_equal(clean, noisy)
    with pytest.raises(ConfigError, match="noise"):
        run_expert(physics, "pick_place", 3, noise=-0.1)



def test_pad_at_fixes_the_pad_and_keeps_the_cubes_clear_of_it():
    from vla_scale.eval.mujoco_backend import PAD_CLEARANCE

    with MujocoBackend(cameras=(), objects=1, pads=1, pad_at=(0.0, 0.16)) as backend:
        solved = 0
        for seed in range(12):
            backend.reset("pick_place", seed)
            view = backend.scene()
            (pad,) = view.pads.values()
            assert np.allclose(pad.center, [0.0, 0.16])
            (cube,) = view.objects.values()
            assert np.linalg.norm(cube[:2] - pad.center) >= PAD_CLEARANCE - 1e-9
            solved += run_expert(backend, "pick_place", seed)
        assert solved >= 11
    for bad, match in (({"pad_at": (0.0, 0.16), "pads": 2}, "pads=1"), ({"pad_at": (0.5, 0.0), "pads": 1}, "pad_at"),
                       ({"pad_at": (0.0,), "pads": 1}, "pad_at")):
        with pytest.raises(ConfigError, match=match):
            MujocoBackend(cameras=(), **bad)


SPOTS = [(-0.08, -0.12), (0.08, -0.12), (-0.08, 0.02), (0.08, 0.02)]


def test_object_at_puts_the_cube_on_a_spot_drawn_per_seed_and_changes_nothing_else():
    """Each episode's cube sits on one of the spots, every spot comes up over a few seeds, the instruction,
    goal and pad are those of the same seed without spots, a variant keeps the seed's spot, and the expert
    solves them."""
    scene = {"objects": 1, "pads": 1, "pad_at": (0.0, 0.16)}
    with MujocoBackend(cameras=(), **scene, object_at=SPOTS) as spots, MujocoBackend(cameras=(), **scene) as free:
        seen, solved = set(), 0
        for seed in range(16):
            obs = spots.reset("pick_place", seed)
            view = spots.scene()
            cube = view.objects[view.goal["object"]]
            hits = [i for i, p in enumerate(SPOTS) if np.allclose(cube[:2], p, atol=1e-6)]
            assert len(hits) == 1, (seed, cube)
            seen.add(hits[0])
            assert obs.instruction == free.reset("pick_place", seed).instruction
            assert view.goal == free.scene().goal and view.pads.keys() == free.scene().pads.keys()
            for variant in ("distractors", "lighting"):
                spots.reset("pick_place", seed, variant)
                moved = spots.scene()
                assert np.allclose(moved.objects[moved.goal["object"]][:2], SPOTS[hits[0]], atol=1e-6)
            solved += run_expert(spots, "pick_place", seed)
        assert seen == set(range(len(SPOTS)))
        assert solved >= 15


@pytest.mark.parametrize("bad, match", [
    ({"object_at": [(0.5, 0.0)], "pad_at": (0.0, 0.16)}, "placement area"),
    ({"object_at": [(0.0,)], "pad_at": (0.0, 0.16)}, "placement area"),
    ({"object_at": [[0.0], [1.0, 2.0]], "pad_at": (0.0, 0.16)}, "placement area"),
    ({"object_at": [], "pad_at": (0.0, 0.16)}, "placement area"),
    ({"object_at": [(0.0, 0.12)], "pad_at": (0.0, 0.16)}, r"within 0\.\d+ m of the pad"),
    ({"object_at": [(0.0, -0.1)]}, "needs objects=1 and pad_at"),
])
def test_bad_object_at_is_a_config_error_naming_it(bad, match):
    with pytest.raises(ConfigError, match=match):
        MujocoBackend(cameras=(), objects=1, pads=1, **bad)
    with pytest.raises(ConfigError, match="objects=1"):
        MujocoBackend(cameras=(), objects=2, pads=1, pad_at=(0.0, 0.16), object_at=SPOTS)


def test_the_pick_expert_closes_within_the_grasp_reach_of_the_cube_not_only_at_its_centre(physics):
    """Once at the cube's phase, a gripper 5 mm to the side and 3 mm up (a cube that slid, a noisy arrival)
    closes where it is; 12 mm to the side it keeps moving towards the cube with the gripper open."""
    from vla_scale.eval.experts import GRASP_REACH, make_expert

    physics.reset("pick_place", 2)
    view = physics.scene()
    cube = view.objects[view.goal["object"]]
    for off, closes in (((0.005, 0.0, 0.003), True), ((0.012, 0.0, 0.0), False)):
        assert (np.hypot(*off[:2]) <= GRASP_REACH[0] and abs(off[2]) <= GRASP_REACH[1]) == closes
        expert = make_expert("pick_place")
        expert.phase = 1  # the phase that goes to the cube's centre and hands over to closing
        action, _ = expert.act(replace(view, ee_pos=cube + np.array(off)))
        assert (action[6] == 1.0) == closes, off
        if closes:
            assert np.all(action[:3] == 0.0)  # closes where it is
        else:
            assert action[0] < 0  # towards the cube


def test_until_success_ends_the_episode_at_its_first_success(physics):
    whole, cut = [], []
    assert run_expert(physics, "pick_place", 6, lambda o, a, t: whole.append(physics.success()))
    assert run_expert(physics, "pick_place", 6, lambda o, a, t: cut.append(physics.success()), until_success=True)
    assert physics.success()  # it ends solved...
    assert not any(cut)  # ...and no step before the last one started from a solved scene
    assert len(cut) < len(whole) and not any(whole[:len(cut)])


def test_the_pick_expert_closes_in_on_a_cone_never_straight_down_beside_the_cube(physics):
    """Before it closes, every downward step of the expert also moves it towards the cube while it is
    off to the side, its height over the cube shrinks with the distance to the side (the cone), and the
    open fingertips stay above the cube's top until the cube is between them."""
    from vla_scale.eval.experts import CARRY_Z, FUNNEL_RISE, FUNNEL_SLOPE, MAX_STEP, make_expert

    for seed in range(5):
        physics.reset("pick_place", seed)
        expert = make_expert("pick_place")
        on_cone = False
        for _ in range(120):
            view = physics.scene()
            action, done = expert.act(view)
            if done or action[6] > 0.5:
                break
            cube = view.objects[view.goal["object"]]
            off = np.linalg.norm(cube[:2] - view.ee_pos[:2])
            if off > 0.005 and action[2] < 0:
                to_cube = (cube[:2] - view.ee_pos[:2]) / off
                assert float(action[:2] @ to_cube) > 0, (seed, view.ee_pos, cube)
            cone = min(CARRY_Z - cube[2], FUNNEL_RISE + FUNNEL_SLOPE * off)
            on_cone = on_cone or view.ee_pos[2] - cube[2] <= cone
            if on_cone:  # once on the cone (from home it first comes down to it), it stays within a step of it
                assert view.ee_pos[2] - cube[2] <= cone + MAX_STEP, (seed, view.ee_pos, cube)
            if off > 0.02:  # the fingertips reach 15 mm under the grasp point
                assert view.ee_pos[2] - 0.015 > cube[2] + view.object_half, (seed, view.ee_pos, cube)
            physics.step(action)
        assert action[6] > 0.5 and physics.scene().held is None  # it got to the closing step


def test_pick_place_expert_stands_still_one_step_at_the_grasp_and_one_at_the_release(physics):
    """Zero-motion frames are fixed points for a policy that sees one frame; the demonstrations keep them few."""
    actions, _, ok = _episode(physics, 4)
    assert ok
    still = np.flatnonzero(np.linalg.norm(actions[:, :3], axis=1) == 0)
    assert len(still) == 2
    closes, opens = still
    assert actions[closes, 6] == 1.0 and actions[closes - 1, 6] == 0.0  # the step that closes the gripper
    assert actions[opens, 6] == 0.0 and actions[opens - 1, 6] == 1.0  # the step that opens it
