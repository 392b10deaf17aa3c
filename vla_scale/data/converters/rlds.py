"""RLDS datasets in TFDS format (Open X-Embodiment: fractal, bridge, ...) -> robot shards.

    vla-scale convert rlds DIR OUT [--rlds-config NAME] [--split train]

DIR is a prepared TFDS dataset folder on local disk (the one holding dataset_info.json and the
*.tfrecord files, e.g. .../fractal20220817_data/0.1.0). It is read with tensorflow-datasets'
own reader (`tfds.builder_from_directory`), so the optional extra `vla-scale[rlds]`
(tensorflow-datasets + tensorflow-cpu) must be installed; without it the converter is an error
saying so. Episodes are read one at a time (their steps in memory, frames encoded), never the
dataset.

Each dataset's layout is mapped through one small table entry (`RLDS_CONFIGS`), after OpenVLA's
Open X-Embodiment configs (prismatic/vla/datasets/rlds/oxe: `configs.py`, `transforms.py`):
- "rlds" (the RLDS default; any dataset already in this shape): observation/image,
  observation/wrist_image (if present), observation/state (if present), a flat float action,
  step-level language_instruction;
- "fractal20220817_data" (RT-1 / Google robot): action = world_vector (3) + rotation_delta (3) +
  gripper made absolute (+1 open, 0 closed) from the relative gripper_closedness_action, as
  OpenVLA's `rt1_dataset_transform`; instruction observation/natural_language_instruction;
  state base_pose_tool_reached + gripper_closed;
- "bridge_dataset" (Bridge as released in OXE): action = world_vector + rotation_delta +
  open_gripper, as OpenVLA's `bridge_oxe_dataset_transform` WITHOUT its `relabel_bridge_actions`
  (which recomputes actions from states); instruction observation/natural_language_instruction.
--rlds-config names the entry (default: the dataset's own name when it is in the table, else
"rlds"). This module never downloads anything and never writes to DIR.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from vla_scale.data.camera_images import DEFAULT_CODEC, ImageCodec
from vla_scale.data.converters.common import (BadSampleError, PendingEpisode, ProgressCallback, RobotEpisode,
                                              dataset_name_for, write_robot_episodes)
from vla_scale.data.writer import DEFAULT_SIZE_LIMIT, ShardWriter, check_output
from vla_scale.errors import DataError


def rel2abs_gripper(actions: np.ndarray) -> np.ndarray:
    """OpenVLA's `rel2abs_gripper_actions`: relative gripper commands (< -0.1 open, > 0.1 close, else keep)
    -> absolute 1 (open) / 0 (closed); before the first command, the opposite of it (open when none)."""
    a = np.asarray(actions, dtype=np.float64).reshape(-1)
    thresholded = np.where(a < -0.1, 1, np.where(a > 0.1, -1, 0))
    nonzero = np.flatnonzero(thresholded)
    state = -thresholded[nonzero[0]] if nonzero.size else 1
    out = np.empty(a.shape[0], dtype=np.float32)
    for i, t in enumerate(thresholded):
        state = state if t == 0 else t
        out[i] = state
    return out / 2 + 0.5


def _get(step: dict[str, Any], path: str) -> Any:
    node: Any = step
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class RLDSConfig:
    """How one dataset's steps map onto the shard schema (one entry of `RLDS_CONFIGS`)."""

    image: str = "observation/image"
    wrist: str | None = None
    state: tuple[str, ...] = ()
    instruction: str = "language_instruction"
    # steps (dicts of numpy arrays, one episode) -> (T, D) actions
    actions: Callable[[list[dict[str, Any]]], np.ndarray] = field(
        default=lambda steps: np.stack([np.asarray(s["action"], np.float32).reshape(-1) for s in steps]))


def _fractal_actions(steps: list[dict[str, Any]]) -> np.ndarray:
    a = [s["action"] for s in steps]
    grip = rel2abs_gripper(np.stack([np.asarray(x["gripper_closedness_action"]).reshape(-1)[0] for x in a]))
    return np.concatenate([np.stack([x["world_vector"] for x in a]), np.stack([x["rotation_delta"] for x in a]),
                           grip[:, None]], axis=1).astype(np.float32)


def _bridge_actions(steps: list[dict[str, Any]]) -> np.ndarray:
    a = [s["action"] for s in steps]
    grip = np.stack([np.asarray(x["open_gripper"], np.float32).reshape(-1)[0] for x in a])
    return np.concatenate([np.stack([x["world_vector"] for x in a]), np.stack([x["rotation_delta"] for x in a]),
                           grip[:, None]], axis=1).astype(np.float32)


RLDS_CONFIGS: dict[str, RLDSConfig] = {
    "rlds": RLDSConfig(wrist="observation/wrist_image", state=("observation/state",)),
    "fractal20220817_data": RLDSConfig(state=("observation/base_pose_tool_reached", "observation/gripper_closed"),
                                       instruction="observation/natural_language_instruction",
                                       actions=_fractal_actions),
    "bridge_dataset": RLDSConfig(instruction="observation/natural_language_instruction", actions=_bridge_actions),
}


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"convert rlds needs tensorflow-datasets and tensorflow (pip install 'vla-scale[rlds]'): "
                        f"{e}") from None
    return tfds


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        return _text(value.reshape(-1)[0])
    return str(value) if value is not None else ""


def _episodes(tfds, builder, split: str, cfg: RLDSConfig, codec: ImageCodec, root: Path) -> Iterator[PendingEpisode]:
    from vla_scale.data.converters.common import encode_frame

    ds = builder.as_dataset(split=split, shuffle_files=False)
    for index, episode in enumerate(tfds.as_numpy(ds)):
        where = f"{root} ({split}): episode {index}"
        raw_steps = episode["steps"]
        try:  # a nested tf.data.Dataset; tfds.as_numpy usually hands back an iterable of numpy dicts already
            steps = list(tfds.as_numpy(raw_steps))
        except TypeError:
            steps = list(raw_steps)

        def load(steps=steps, where=where, index=index) -> RobotEpisode:
            if not steps:
                raise BadSampleError("empty episode", f"{where}: no steps")
            try:
                actions = cfg.actions(steps)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{where}: the actions do not have this config's layout ({type(e).__name__}: {e}); "
                                f"choose another --rlds-config ({sorted(RLDS_CONFIGS)})") from None
            images, wrist = [], [] if cfg.wrist and _get(steps[0], cfg.wrist) is not None else None
            for t, s in enumerate(steps):
                img = _get(s, cfg.image)
                if img is None:
                    raise DataError(f"{where}, step {t}: no image at {cfg.image!r} (steps hold {sorted(s)})")
                images.append(encode_frame(np.asarray(img), f"{where}, step {t}", codec))
                if wrist is not None:
                    wrist.append(encode_frame(np.asarray(_get(s, cfg.wrist)), f"{where}, step {t} (wrist)", codec))
            texts = [_text(_get(s, cfg.instruction)).strip() for s in steps]
            if not any(texts):
                raise BadSampleError("no instruction", f"{where}: no language instruction at {cfg.instruction!r}")
            states = None
            parts = [[_get(s, k) for s in steps] for k in cfg.state]
            if parts and all(v is not None for p in parts for v in p):
                states = np.concatenate([np.stack([np.asarray(v, np.float32).reshape(-1) for v in p]) for p in parts],
                                        axis=1)
            return RobotEpisode(where=where, episode=index, actions=actions, images=images, instructions=texts,
                                states=states, wrist_images=wrist, images_verified=True)

        yield PendingEpisode(where, len(steps), load)


def convert_rlds(src: str | Path, out: str | Path, *, rlds_config: str | None = None, split: str = "train",
                 dataset_name: str | None = None, skip_bad: bool = False, overwrite: bool = False,
                 size_limit: int | str | None = DEFAULT_SIZE_LIMIT, compression: str | None = None,
                 progress: bool = True, callback: ProgressCallback | None = None,
                 codec: ImageCodec | None = None) -> dict[str, Any]:
    """Convert a prepared TFDS (RLDS) dataset folder to robot shards in OUT; returns the summary."""
    root = Path(src)
    if not (root / "dataset_info.json").is_file():
        raise DataError(f"{root}: no dataset_info.json; pass the TFDS version folder (e.g. "
                        f".../fractal20220817_data/0.1.0)")
    check_output(out, overwrite)
    tfds = _tfds()
    try:
        builder = tfds.builder_from_directory(str(root))
    except Exception as e:  # tfds raises its own types for malformed metadata
        raise DataError(f"{root}: cannot open it as a TFDS dataset: {type(e).__name__}: {e}") from None
    name = rlds_config or (builder.name if builder.name in RLDS_CONFIGS else "rlds")
    if name not in RLDS_CONFIGS:
        raise DataError(f"--rlds-config {name!r} is not one of {sorted(RLDS_CONFIGS)}")
    if split not in builder.info.splits:
        raise DataError(f"{root}: no split {split!r}; splits: {sorted(builder.info.splits)}")
    codec = codec or DEFAULT_CODEC
    dataset = dataset_name or builder.name or dataset_name_for(root, None)
    meta = {"kind": "rlds", "source": str(root.resolve()), "dataset": dataset, "rlds_config": name, "split": split}
    total = int(builder.info.splits[split].num_examples)
    with ShardWriter(out, overwrite=overwrite, size_limit=size_limit, compression=compression, metadata=meta,
                     codec=codec) as writer:
        write_robot_episodes(writer, _episodes(tfds, builder, split, RLDS_CONFIGS[name], codec, root),
                             dataset=dataset, skip_bad=skip_bad, total=total, progress=progress, callback=callback)
    return writer.summary
