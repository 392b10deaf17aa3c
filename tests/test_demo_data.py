"""The demo's simulator data: robot steps and the questions asked about the very frames stored with them.

Questions are generated from the simulator's state at the step whose image is stored beside them; these
tests check that pairing on the stored (JPEG) images themselves: the point to grasp a named block lands on
that block's colour in the stored picture, and the caption's left-to-right order is the colours' order in it.
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import json
import re

import numpy as np
import pytest

from streaming_helpers import read_plain  # noqa: F401  (fixture)
from vla_scale.data.camera_images import decode_camera_image
from vla_scale.demo.simdata import VL_FOLDERS, write_scene_questions, write_sim_data
from vla_scale.errors import ConfigError
from vla_scale.eval.mujoco_backend import OBJECT_COLOURS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    summary = write_sim_data(out, ["pick_place", "push"], episodes=3, seed=5, vl_rate=0.25)
    return out, summary


def _colour_mask(image: np.ndarray, name: str, tol: float = 60.0) -> np.ndarray:
    """Pixels whose colour is nearest to the block colour `name` among the palette and within `tol`."""
    palette = {n: 255 * np.array(c) for n, c in OBJECT_COLOURS.items()}
    d = {n: np.linalg.norm(image.astype(float) - c, axis=-1) for n, c in palette.items()}
    nearest = np.argmin(np.stack(list(d.values())), axis=0)
    return (nearest == list(palette).index(name)) & (d[name] < tol)


def test_robot_shards_hold_whole_successful_episodes_with_stats(sim_data, read_plain):
    out, summary = sim_data
    robot = read_plain(out / "robot")
    assert summary["robot"]["samples"] == len(robot) > 0
    episodes = sorted({int(s["episode"]) for s in robot})
    assert episodes == list(range(summary["robot"]["episodes"]))
    for e in episodes:  # every step of every written episode, in order
        steps = [int(s["step"]) for s in robot if int(s["episode"]) == e]
        assert steps == list(range(len(steps)))
    stats = json.loads((out / "robot" / "stats.json").read_text())
    assert len(stats["q01"]) == 7
    for kind in VL_FOLDERS:
        assert summary[kind]["samples"] > 0


def _point_hits(samples) -> tuple[int, int]:
    checked_points = hits = 0
    for s in samples:
        q, a = s["turns"][0]["question"], s["turns"][0]["answer"]
        m = re.match(r"Point to where to grasp the (\w+) block\.", q)
        if not m:
            continue
        img = np.asarray(decode_camera_image(s["image"]).convert("RGB"))
        u, v = (float(t) for t in re.match(r"\((\S+), (\S+)\)", a).groups())
        x, y = int(u * img.shape[1]), int(v * img.shape[0])
        win = _colour_mask(img, m.group(1))[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
        checked_points += 1
        hits += bool(win.any())
    return hits, checked_points


def test_points_and_captions_describe_the_stored_frame(sim_data, read_plain):
    out, _ = sim_data
    checked_captions = 0
    hits, checked_points = _point_hits(read_plain(out / "affordance"))
    # The gripper's fingers may cover a block it is grasping; everything else must match.
    assert checked_points >= 10 and hits >= 0.85 * checked_points, (hits, checked_points)
    for s in read_plain(out / "vqa"):
        q, a = s["turns"][0]["question"], s["turns"][0]["answer"]
        if q != "Describe the scene.":
            continue
        img = np.asarray(decode_camera_image(s["image"]).convert("RGB"))
        listed = re.findall(r"an? (\w+) block", a)
        cx = {}
        for name in listed:
            ys, xs = np.nonzero(_colour_mask(img, name))
            if len(xs) >= 8:
                cx[name] = xs.mean()
        ranked = sorted(cx.values())
        if len(cx) == len(listed) and min(np.diff(ranked)) > 6:  # every block visible and clearly apart
            assert [n for n in listed if n in cx] == sorted(cx, key=cx.get), (q, a)
            checked_captions += 1
    assert checked_captions >= 3


def test_same_call_same_shards_and_bad_input(tmp_path, sim_data, read_plain):
    out, _ = sim_data
    again = tmp_path / "again"
    write_sim_data(again, ["pick_place", "push"], episodes=3, seed=5, vl_rate=0.25)
    for kind in ("robot", "spatial"):
        a, b = read_plain(out / kind), read_plain(again / kind)
        assert [s.get("turns") or s["instruction"] for s in a] == [s.get("turns") or s["instruction"] for s in b]
    with pytest.raises(ConfigError, match="unknown evaluation task 'fly'"):
        write_sim_data(tmp_path / "bad", ["fly"], episodes=1, seed=0)
    with pytest.raises(ConfigError, match="episodes must be at least 1"):
        write_sim_data(tmp_path / "bad", ["push"], episodes=0, seed=0)
    assert not (tmp_path / "bad").exists()


def test_scene_questions_cover_many_layouts_and_match_their_frames(tmp_path, read_plain):
    summary = write_scene_questions(tmp_path / "scenes", 16, seed=3)
    assert {k: v["samples"] for k, v in summary.items()} == {"vqa": 32, "spatial": 16, "affordance": 16}
    affordance = read_plain(tmp_path / "scenes" / "affordance")
    hits, checked = _point_hits(affordance)
    assert checked >= 8 and hits == checked  # the gripper is at home: nothing covers a block
    images = {np.asarray(decode_camera_image(s["image"]).convert("RGB")).tobytes() for s in affordance}
    assert len(images) == 16  # every scene its own layout


def test_dart_noise_in_the_demonstrations_is_reproducible_and_bad_noise_writes_nothing(tmp_path, read_plain):
    """Noisy demonstrations visit other states than clean ones, record the expert's actions (never longer than
    its step), and the same call writes the same samples; a negative noise is refused before anything lands."""
    from vla_scale.eval.experts import MAX_STEP

    def robot(name, noise):
        write_sim_data(tmp_path / name, ["pick_place"], episodes=1, seed=7, vl_rate=0.2, noise=noise,
                       scene={"objects": 1, "pads": 1})
        rows = read_plain(tmp_path / name / "robot")
        return np.array([r["state"] for r in rows]), np.array([r["action"] for r in rows])

    clean_states, _ = robot("clean", 0.0)
    states, actions = robot("noisy", 0.006)
    again_states, again_actions = robot("again", 0.006)
    assert np.array_equal(states, again_states) and np.array_equal(actions, again_actions)
    assert len(states) != len(clean_states) or not np.array_equal(states, clean_states)
    assert np.linalg.norm(actions[:, :3], axis=1).max() <= MAX_STEP + 1e-6
    with pytest.raises(ConfigError, match="noise"):
        write_sim_data(tmp_path / "bad_noise", ["pick_place"], episodes=1, seed=7, noise=-1.0)
    assert not (tmp_path / "bad_noise").exists()


def test_a_wrist_camera_is_stored_with_every_robot_step_and_bad_cameras_write_nothing(tmp_path, read_plain):
    """With cameras=("primary", "wrist") each robot sample holds that step's wrist view (the first step's is
    the reset's, rendered again here); the questions stay about the primary image alone."""
    from vla_scale.eval.mujoco_backend import MujocoBackend

    scene = {"objects": 1, "pads": 1, "pad_at": (0.0, 0.16)}
    write_sim_data(tmp_path / "d", ["pick_place"], episodes=1, seed=3, vl_rate=0.3, scene=scene,
                   cameras=("primary", "wrist"))
    robot = read_plain(tmp_path / "d" / "robot")
    assert robot and all(len(r["wrist_image"]) > 0 for r in robot)
    with MujocoBackend(cameras=("primary", "wrist"), **scene) as backend:
        obs = backend.reset("pick_place", 3)
    first = robot[0]
    stored = {c: np.asarray(decode_camera_image(first[k]).convert("RGB"), dtype=float)
              for c, k in (("primary", "image"), ("wrist", "wrist_image"))}
    for cam in ("primary", "wrist"):
        assert np.abs(stored[cam] - obs.images[cam]).mean() < 3.0, cam  # the same view, through JPEG
    assert np.abs(stored["wrist"] - stored["primary"]).mean() > 20.0  # and two different views
    for kind in VL_FOLDERS:
        assert all(len(r["wrist_image"]) == 0 for r in read_plain(tmp_path / "d" / kind))
    for bad in (("wrist",), ("primary", "primary"), ()):
        with pytest.raises(ConfigError, match="cameras"):
            write_sim_data(tmp_path / "bad", ["pick_place"], episodes=1, seed=3, cameras=bad)
        assert not (tmp_path / "bad").exists()
