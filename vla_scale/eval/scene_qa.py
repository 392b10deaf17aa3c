"""Vision-language questions about the built-in tabletop's own scenes, answered from the simulator.

The paper co-trains the VLA with VQA, spatial-reasoning and affordance data
so that its vision features keep meaning something. For the demo (and for
anyone pretraining a tiny VLM on these scenes) the same three kinds are
generated here from rendered MuJoCo scenes, with answers computed from the
simulator's state, never from pixels:

- vqa: colours by relation ("What colour is the block nearest the white
  pad?", "What colour is the leftmost block?"), presence ("Is there a red
  block?") and a caption listing the blocks from left to right;
- spatial: relations in the image ("Is the red block left of the blue
  block?" yes/no; "Which block is closest to the gripper?" by 3-D
  distance; "Is the red block nearer the camera than the blue one?");
- affordance: points, RoboPoint-style: "Point to where to grasp the red
  block." -> "(0.43, 0.61)", the centre of the block's top face projected into the image
  (x right, y down, both in [0, 1], 2 decimals); "Point to the white pad."

"Left" and "right" are the camera's (image columns). Scenes are taken along
scripted-expert rollouts (a random number of steps into an episode), so the
gripper appears where it does in the robot data. Everything is a function of
(kind, seed): the same call writes the same shards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vla_scale.errors import ConfigError

KINDS = ("vqa", "spatial", "affordance", "caption")


def camera_matrix(backend: Any, camera: str = "primary") -> tuple[np.ndarray, np.ndarray, float]:
    """(position, rotation whose columns are the camera's x/y/z axes in world coordinates, vertical field of
    view in radians): MuJoCo's cam_xmat, which maps camera coordinates to world ones."""
    import mujoco

    cam = mujoco.mj_name2id(backend.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    if cam < 0:
        raise ConfigError(f"no camera named {camera!r} in the scene")
    mujoco.mj_kinematics(backend.model, backend.data)
    mujoco.mj_camlight(backend.model, backend.data)
    return (backend.data.cam_xpos[cam].copy(), backend.data.cam_xmat[cam].reshape(3, 3).copy(),
            float(np.deg2rad(backend.model.cam_fovy[cam])))


def project(backend: Any, points: np.ndarray, camera: str = "primary") -> np.ndarray:
    """World points (N, 3) -> image points (N, 2) in [0, 1] units: x to the right, y down (square image).

    MuJoCo cameras look along their -z axis with +y up; the image's vertical field of view is fovy."""
    pos, rot, fovy = camera_matrix(backend, camera)
    rel = (np.asarray(points, dtype=np.float64).reshape(-1, 3) - pos) @ rot  # camera coordinates: rot^T (p - pos)
    depth = -rel[:, 2]
    if np.any(depth <= 0):
        raise ValueError("a point is behind the camera")
    f = 0.5 / np.tan(fovy / 2)  # focal length in image-height units
    return np.stack([0.5 + f * rel[:, 0] / depth, 0.5 - f * rel[:, 1] / depth], axis=1)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _fmt_point(p: np.ndarray) -> str:
    return f"({p[0]:.2f}, {p[1]:.2f})"


def questions(backend: Any, rng: np.random.Generator, kind: str) -> list[dict[str, str]]:
    """Question/answer turns of `kind` about the backend's current scene (primary camera)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown scene question kind {kind!r}; kinds: {', '.join(KINDS)}")
    view = backend.scene()
    names = list(view.objects)
    centres = np.stack([view.objects[n] for n in names])
    uv = project(backend, centres + [0.0, 0.0, view.object_half])  # top faces: what the camera sees
    pads = list(view.pads)
    pad_uv = project(backend, np.array([[*view.pads[p].center, view.table_z] for p in pads]))
    cam_pos, _, _ = camera_matrix(backend)
    order = [names[i] for i in np.argsort(uv[:, 0])]  # left to right in the image
    # Two blocks to relate; a scene of one block (`MujocoBackend(objects=1)`) relates it to a pad instead.
    a, b = (int(i) for i in rng.choice(len(names), 2, replace=False)) if len(names) > 1 else (0, 0)
    if kind == "caption":
        return [{"question": "Describe the scene.",
                 "answer": "from left to right: " + ", ".join(f"{_article(n)} {n} block" for n in order)
                           + "; pads: " + " and ".join(f"{p}" for p in (pads[i] for i in np.argsort(pad_uv[:, 0])))}]
    if kind == "vqa":
        options = []
        pad = pads[int(rng.integers(len(pads)))]
        d = np.linalg.norm(centres[:, :2] - view.pads[pad].center, axis=1)
        options.append((f"What colour is the block nearest the {pad} pad?", names[int(np.argmin(d))]))
        options.append(("What colour is the leftmost block?", order[0]))
        options.append(("What colour is the rightmost block?", order[-1]))
        # Presence: a colour from the palette, present or not (the easiest question that needs the image).
        from vla_scale.eval.mujoco_backend import OBJECT_COLOURS

        palette = sorted(set(OBJECT_COLOURS) | set(names))
        colour = palette[int(rng.integers(len(palette)))]
        options.append((f"Is there {_article(colour)} {colour} block?", "yes" if colour in names else "no"))
        q, ans = options[int(rng.integers(len(options)))]
        return [{"question": q, "answer": ans}]
    if kind == "spatial" and len(names) == 1:
        p = int(rng.integers(len(pads)))
        pad_xyz = np.array([*view.pads[pads[p]].center, view.table_z])
        options = [(f"Is the {names[0]} block left of the {pads[p]} pad?", "yes" if uv[0, 0] < pad_uv[p, 0] else "no"),
                   (f"Is the {names[0]} block nearer the camera than the {pads[p]} pad?",
                    "yes" if np.linalg.norm(centres[0] - cam_pos) < np.linalg.norm(pad_xyz - cam_pos) else "no")]
        q, ans = options[int(rng.integers(len(options)))]
        return [{"question": q, "answer": ans}]
    if kind == "spatial":
        options = [(f"Is the {names[a]} block left of the {names[b]} block?", "yes" if uv[a, 0] < uv[b, 0] else "no")]
        d = np.linalg.norm(centres - view.ee_pos, axis=1)
        options.append(("Which block is closest to the gripper?", names[int(np.argmin(d))]))
        da, db = np.linalg.norm(centres[a] - cam_pos), np.linalg.norm(centres[b] - cam_pos)
        options.append((f"Is the {names[a]} block nearer the camera than the {names[b]} block?",
                        "yes" if da < db else "no"))
        q, ans = options[int(rng.integers(len(options)))]
        return [{"question": q, "answer": ans}]
    if rng.random() < 0.75:
        return [{"question": f"Point to where to grasp the {names[a]} block.", "answer": _fmt_point(uv[a])}]
    p = int(rng.integers(len(pads)))
    return [{"question": f"Point to the {pads[p]} pad.", "answer": _fmt_point(pad_uv[p])}]


def scene_frames(backend: Any, n: int, seed: int):
    """Yield `n` (observation, rng) pairs: scenes along scripted-expert rollouts of random tasks and seeds."""
    from vla_scale.eval.tasks import TASKS

    rng = np.random.default_rng([seed, 0x5CE7E])
    tasks = sorted(TASKS)
    for i in range(n):
        task = tasks[int(rng.integers(len(tasks)))]
        obs = backend.reset(task, int(rng.integers(2**31)))
        expert = backend.expert()
        for _ in range(int(rng.integers(0, 60))):
            action, done = expert.act()
            if done:
                break
            obs = backend.step(action)
        yield obs, rng


def write_scene_vl(out_dir: str | Path, kind: str, n: int, seed: int, *, image_size: int = 128,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write `n` scene questions of `kind` as co-training shards ('caption' is written as task vqa)."""
    from vla_scale.data.schema import vl_sample
    from vla_scale.data.writer import ShardWriter
    from vla_scale.eval.mujoco_backend import MujocoBackend

    if kind not in KINDS:
        raise ConfigError(f"unknown scene question kind {kind!r}; kinds: {', '.join(KINDS)}")
    task = "vqa" if kind == "caption" else kind
    dataset = f"mujoco_scene_{kind}"
    with MujocoBackend(cameras=("primary",), image_size=image_size) as backend, \
            ShardWriter(out_dir, overwrite=overwrite, metadata={"source": dataset, "seed": seed}) as writer:
        for i, (obs, rng) in enumerate(scene_frames(backend, n, seed)):
            writer.write(vl_sample(image=obs.images["primary"], turns=questions(backend, rng, kind), task=task,
                                   dataset=dataset, where=f"{dataset} #{i}"))
    return writer.summary
