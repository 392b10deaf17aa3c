"""Questions about the tabletop's scenes are right about the pictures they come with: answers are checked
against the rendered pixels (where each block's colour actually appears), not against the generator's math."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import re

import numpy as np
import pytest

from streaming_helpers import read_plain  # noqa: F401  (fixture)
from vla_scale.errors import ConfigError
from vla_scale.eval.mujoco_backend import OBJECT_COLOURS, MujocoBackend
from vla_scale.eval.scene_qa import KINDS, project, questions, scene_frames, write_scene_vl

SIZE = 128


@pytest.fixture(scope="module")
def scenes():
    """30 scenes along expert rollouts, each with the generator's questions and the blocks' true pixel masks.

    The masks come from MuJoCo's segmentation rendering (geom ids per pixel) with the gripper moved out of
    view for that one render, so no block is hidden behind it: the renderer, not the projection under test,
    says where each block is in the image."""
    import mujoco

    with MujocoBackend(cameras=("primary",), image_size=SIZE) as backend:
        seg = mujoco.Renderer(backend.model, SIZE, SIZE)
        seg.enable_segmentation_rendering()
        geoms = {mujoco.mj_id2name(backend.model, mujoco.mjtObj.mjOBJ_GEOM, g): g
                 for g in range(backend.model.ngeom)}
        out = []
        for k, (obs, rng) in enumerate(scene_frames(backend, 30, seed=4)):
            view = backend.scene()
            asked = {kind: questions(backend, np.random.default_rng(k), kind) for kind in KINDS}
            uv = project(backend, np.stack(list(view.objects.values())) + [0, 0, view.object_half])
            saved = backend.data.mocap_pos[0].copy()
            backend.data.mocap_pos[0] = [0.0, 0.0, 5.0]
            mujoco.mj_forward(backend.model, backend.data)
            seg.update_scene(backend.data, camera="primary")
            ids = seg.render()
            backend.data.mocap_pos[0] = saved
            mujoco.mj_forward(backend.model, backend.data)
            # The backend colours geom objI by the I-th name in the scene; find each block's geom by colour.
            masks = {}
            for name in view.objects:
                gid = next(g for n, g in geoms.items() if n and n.startswith("obj")
                           and np.allclose(backend.model.geom_rgba[g, :3], OBJECT_COLOURS[name]))
                masks[name] = (ids[..., 0] == gid) & (ids[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM))
            out.append({"view": view, "masks": masks, "asked": asked, "uv": uv})
        seg.close()
        yield out


def _covered(view, name):
    p = view.objects[name]
    return any(np.linalg.norm(q[:2] - p[:2]) < 2 * view.object_half and q[2] > p[2]
               for n, q in view.objects.items() if n != name)


def test_projected_block_tops_land_on_their_blocks_pixels(scenes):
    checked = 0
    for s in scenes:
        for name, (u, v) in zip(s["view"].objects, s["uv"]):
            if _covered(s["view"], name):
                continue  # a block stacked on it hides its top face
            ys, xs = np.nonzero(s["masks"][name])
            assert len(xs) >= 20, name  # every block is in view
            # The top face's centre is a pixel of the block, near the middle of its visible extent.
            assert np.min(np.hypot(xs + 0.5 - u * SIZE, ys + 0.5 - v * SIZE)) <= 1.0, name
            assert xs.min() <= u * SIZE <= xs.max() + 1 and ys.min() <= v * SIZE <= ys.max() + 1, name
            checked += 1
    assert checked >= 110


def test_answers_agree_with_the_pixels(scenes):
    kinds_seen = set()
    for s in scenes:
        masks = s["masks"]
        cx = {n: np.nonzero(m)[1].mean() for n, m in masks.items()}
        for kind, turns in s["asked"].items():
            q, a = turns[0]["question"], turns[0]["answer"]
            if m := re.match(r"Is the (\w+) block left of the (\w+) block\?", q):
                x, y = m.groups()
                if x in cx and y in cx and abs(cx[x] - cx[y]) > 3:
                    assert a == ("yes" if cx[x] < cx[y] else "no"), q
                    kinds_seen.add("left_of")
            elif q in ("What colour is the leftmost block?", "What colour is the rightmost block?"):
                ranked = sorted(cx.values())
                if abs(ranked[0] - ranked[1]) > 3 and abs(ranked[-1] - ranked[-2]) > 3:
                    pick = min if "leftmost" in q else max
                    assert a == pick(cx, key=cx.get), q
                    kinds_seen.add("extreme")
            elif m := re.match(r"Point to where to grasp the (\w+) block\.", q):
                name = m.group(1)
                u, v = (float(t) for t in re.match(r"\((\S+), (\S+)\)", a).groups())
                if not _covered(s["view"], name):
                    ys, xs = np.nonzero(masks[name])
                    assert np.min(np.hypot(xs + 0.5 - u * SIZE, ys + 0.5 - v * SIZE)) <= 1.5, q  # 2-decimal rounding
                    kinds_seen.add("point")
            elif q == "Describe the scene.":
                listed = re.findall(r"an? (\w+) block", a)
                assert sorted(listed) == sorted(masks)
                ranked = sorted(cx.values())
                if min(np.diff(ranked)) > 3:
                    assert listed == sorted(cx, key=cx.get)
                    kinds_seen.add("caption")
            elif m := re.match(r"Is there an? (\w+) block\?", q):
                assert a == ("yes" if masks.get(m.group(1)) is not None and masks[m.group(1)].sum() > 0 else "no"), q
                kinds_seen.add("presence")
            elif q == "Which block is closest to the gripper?":
                view = s["view"]
                d = {n: np.linalg.norm(p - view.ee_pos) for n, p in view.objects.items()}
                assert a == min(d, key=d.get)
    assert {"caption", "point", "left_of", "extreme", "presence"} <= kinds_seen


def test_scene_shards_are_deterministic_and_readable(tmp_path, read_plain):
    a = write_scene_vl(tmp_path / "a", "spatial", 6, seed=1)
    b = write_scene_vl(tmp_path / "b", "spatial", 6, seed=1)
    assert a["samples"] == b["samples"] == 6
    rows_a, rows_b = read_plain(tmp_path / "a"), read_plain(tmp_path / "b")
    assert [r["turns"] for r in rows_a] == [r["turns"] for r in rows_b]
    assert all(r["task"] == "spatial" for r in rows_a)
    with pytest.raises(ConfigError, match="unknown scene question kind 'poetry'"):
        write_scene_vl(tmp_path / "c", "poetry", 1, seed=0)
    assert not (tmp_path / "c").exists()


def test_one_cube_scenes_relate_the_cube_to_the_pad_as_the_pixels_show():
    """With one cube (`MujocoBackend(objects=1, pads=1)`) spatial questions relate it to the pad; "left of"
    is checked against where the renderer puts the cube's and the pad's pixels."""
    import mujoco

    with MujocoBackend(cameras=("primary",), image_size=SIZE, objects=1, pads=1) as backend:
        seg = mujoco.Renderer(backend.model, SIZE, SIZE)
        seg.enable_segmentation_rendering()
        checked = 0
        for seed in range(40):
            backend.reset("pick_place", seed)
            view = backend.scene()
            (q,) = questions(backend, np.random.default_rng(seed), "spatial")
            m = re.fullmatch(r"Is the (\w+) block left of the (\w+) pad\?", q["question"])
            if m is None:
                assert re.fullmatch(r"Is the \w+ block nearer the camera than the \w+ pad\?", q["question"]), q
                continue
            assert (m[1], m[2]) == (view.goal["object"], view.goal["target"])
            seg.update_scene(backend.data, camera="primary")
            ids = seg.render()[..., 0]
            cube = mujoco.mj_name2id(backend.model, mujoco.mjtObj.mjOBJ_GEOM,
                                     f"obj{backend._object_names.index(m[1])}")
            pad = next(g for g in range(backend.model.ngeom) if (mujoco.mj_id2name(backend.model, mujoco.mjtObj.mjOBJ_GEOM, g) or "")
                       .startswith("pad") and backend.model.geom_pos[g][2] > -1)
            cube_x, pad_x = np.nonzero(ids == cube)[1].mean(), np.nonzero(ids == pad)[1].mean()
            assert q["answer"] == ("yes" if cube_x < pad_x else "no"), (seed, q, cube_x, pad_x)
            checked += 1
        seg.close()
    assert checked >= 10
