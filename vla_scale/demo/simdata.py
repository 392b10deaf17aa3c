"""The demo's data, all from the built-in MuJoCo tabletop in one pass of the scripted experts.

Each expert episode gives robot samples (every step: primary image,
instruction, 7-D action, state) and, at a random subset of its steps,
vision-language questions about that very frame, answered from the
simulator's state (`vla_scale.eval.scene_qa`): captions and colour
questions (written as the `vqa` task), spatial relations (`spatial`) and
RoboPoint-style points (`affordance`). So the co-training data describes the
same scenes the robot acts in, as the paper's spatial and affordance data
describe robot scenes. Every folder is written with the project's
`ShardWriter` (atomic: a folder is complete or absent) and robot folders get
their `stats.json`.

Everything is a function of (tasks, episodes, seed): the same call writes the same shards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vla_scale.errors import ConfigError

VL_KINDS = ("caption", "vqa", "spatial", "affordance")  # question kinds (scene_qa.KINDS)
# Shard folder (and co-training task) of each kind: captions are VQA.
SHARD_TASK = {"caption": "vqa", "vqa": "vqa", "spatial": "spatial", "affordance": "affordance"}
VL_FOLDERS = ("vqa", "spatial", "affordance")


def write_sim_data(out: str | Path, tasks: Sequence[str], episodes: int, seed: int, *, image_size: int = 128,
                   vl_rate: float = 0.3, overwrite: bool = False, scene: dict[str, Any] | None = None,
                   noise: float = 0.0, cameras: Sequence[str] = ("primary",)) -> dict[str, Any]:
    """Run the experts for `episodes` seeds of each task, each episode up to its first success (as evaluation
    episodes end), and write `out/robot` (successful episodes only)
    and `out/vqa` (captions and colour questions), `out/spatial`, `out/affordance`: one question of each kind
on a `vl_rate` share of the steps of those episodes.
    `scene`: the backend's scene settings (`objects`, `pads`: `MujocoBackend`). `noise`: the experts' DART
    noise (`run_expert`; the samples hold the expert's own actions). `cameras`: the robot samples' cameras
    (the primary first; the questions are about the primary image). Returns {folder name: ShardWriter
    summary}."""
    from vla_scale.data.schema import robot_sample, vl_sample
    from vla_scale.data.stats import stats_for_shards
    from vla_scale.data.writer import ShardWriter
    from vla_scale.eval.experts import check_noise, run_expert
    from vla_scale.eval.mujoco_backend import MujocoBackend
    from vla_scale.eval.scene_qa import questions
    from vla_scale.eval.tasks import get_task

    if episodes < 1:
        raise ConfigError(f"episodes must be at least 1, got {episodes}")
    check_noise(noise)  # before any folder exists
    cameras = tuple(cameras)
    if not cameras or cameras[0] != "primary" or len(set(cameras)) != len(cameras):
        raise ConfigError(f"cameras must start with 'primary' and name each camera once, got {list(cameras)}")
    for t in tasks:
        get_task(t)
    out = Path(out)
    meta = {"tasks": list(tasks), "episodes_per_task": episodes, "seed": seed, "noise": noise, **(scene or {})}
    writers = {"robot": ShardWriter(out / "robot", overwrite=overwrite, metadata={**meta, "source": "mujoco_demo"},
                                    cameras=cameras)}
    for folder in VL_FOLDERS:
        writers[folder] = ShardWriter(out / folder, overwrite=overwrite,
                                      metadata={**meta, "source": f"mujoco_scene_{folder}"})
    rng = np.random.default_rng([seed, 0xDA7A])
    try:
        with MujocoBackend(cameras=cameras, image_size=image_size, **(scene or {})) as backend:
            written = 0
            for t_index, task in enumerate(tasks):
                for e in range(episodes):
                    episode_seed = seed + 10_000 * t_index + e
                    robot_rows: list[dict[str, Any]] = []
                    vl_rows: list[tuple[str, dict[str, Any]]] = []

                    def keep(obs, action, step, task=task, episode_seed=episode_seed, e=written):
                        where = f"{task} seed {episode_seed} step {step}"
                        robot_rows.append(robot_sample(
                            image=obs.images["primary"], instruction=obs.instruction,
                            action=action.astype(np.float32), state=obs.state, dataset=f"mujoco_{task}",
                            episode=e, step=step, where=where,
                            cameras={c: obs.images[c] for c in cameras[1:]}))
                        if rng.random() < vl_rate:
                            for kind in VL_KINDS:
                                vl_rows.append((kind, vl_sample(
                                    image=obs.images["primary"], turns=questions(backend, rng, kind),
                                    task=SHARD_TASK[kind], dataset=f"mujoco_scene_{kind}", where=where)))

                    if run_expert(backend, task, episode_seed, keep, noise=noise, until_success=True):
                        for row in robot_rows:
                            writers["robot"].write(row)
                        for kind, row in vl_rows:
                            writers[SHARD_TASK[kind]].write(row)
                        written += 1
                    else:
                        writers["robot"].skip("expert_failed", f"the {task} expert failed on seed {episode_seed}",
                                              samples=len(robot_rows), episodes=1)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    summaries = {name: w.close() for name, w in writers.items()}
    stats_for_shards(out / "robot")
    return summaries


def write_scene_questions(out: str | Path, scenes: int, seed: int, *, image_size: int = 128,
                          overwrite: bool = False, scene: dict[str, Any] | None = None,
                          tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Questions about `scenes` freshly reset scenes (random task, layout and colours each; the gripper at
    home): one question of each kind per scene, into `out/vqa`, `out/spatial`, `out/affordance`.

    Cheap (a reset and one render per scene) and diverse: the source VLM's stage needs many layouts, since
    questions about the few layouts of the demonstrations are answered by recognising the layout (measured:
    a VLM trained on 40 layouts fit its training questions and answered held-out scenes no better than
    without images). `scene`: the backend's scene settings; `tasks`: the tasks whose layouts are drawn (default
    all; a scene of one cube has no two-cube tasks)."""
    from vla_scale.data.schema import vl_sample
    from vla_scale.data.writer import ShardWriter
    from vla_scale.eval.mujoco_backend import MujocoBackend
    from vla_scale.eval.scene_qa import questions
    from vla_scale.eval.tasks import TASKS

    if scenes < 1:
        raise ConfigError(f"scenes must be at least 1, got {scenes}")
    out = Path(out)
    meta = {"scenes": scenes, "seed": seed, **(scene or {})}
    writers = {f: ShardWriter(out / f, overwrite=overwrite, metadata={**meta, "source": f"mujoco_scene_{f}"})
               for f in VL_FOLDERS}
    rng = np.random.default_rng([seed, 0x5CE4E])
    tasks = sorted(tasks or TASKS)
    try:
        with MujocoBackend(cameras=("primary",), image_size=image_size, **(scene or {})) as backend:
            for i in range(scenes):
                obs = backend.reset(tasks[int(rng.integers(len(tasks)))], int(rng.integers(2**31)))
                for kind in VL_KINDS:
                    writers[SHARD_TASK[kind]].write(vl_sample(
                        image=obs.images["primary"], turns=questions(backend, rng, kind), task=SHARD_TASK[kind],
                        dataset=f"mujoco_scene_{kind}", where=f"scene {i}"))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return {name: w.close() for name, w in writers.items()}
