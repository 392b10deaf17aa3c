"""The shard schema: one MDS column set for every co-training sample.

Robot and vision-language samples share one set of columns so that any mix
of sources can be read by one `StreamingDataset`; columns a kind does not
use hold empty values. Shards are plain mosaicml-streaming MDS: readable by
`streaming.StreamingDataset(local=...)` with no code of ours.

| column       | MDS encoding     | robot                               | vision-language                         |
|--------------|------------------|-------------------------------------|-----------------------------------------|
| task         | str              | "robot"                             | "vqa", "spatial" or "affordance"        |
| dataset      | str              | source dataset name                 | source dataset name                     |
| image        | bytes            | primary camera, encoded (JPEG/PNG)  | the image, encoded                      |
| wrist_image  | bytes            | wrist camera, encoded, or b""       | b""                                     |
| image_<name> | bytes            | camera <name> (data.cameras), encoded | column absent                         |
| instruction  | str              | language instruction                | ""                                      |
| action       | ndarray:float32  | (D,) or an action chunk (T, D)      | ABSENT                                  |
| state        | ndarray:float32  | proprioception (S,), or ABSENT      | ABSENT                                  |
| episode      | int64            | episode index within the dataset    | -1                                      |
| step         | int64            | step index within the episode       | -1                                      |
| turns        | json             | []                                  | [{"question": ..., "answer": ...}, ...] |

Camera columns hold encoded image bytes, stored by `ShardWriter` with one
`ImageCodec` (default JPEG 95; source JPEG bytes are kept as they are) and
read with `decode_camera_image`, which also reads older shards whose `image`
column used streaming's `jpeg` encoding: see `vla_scale.data.camera_images`.

ABSENT is the one-element array [nan]: MDS cannot store an empty ndarray
(`MDSWriter` raises "Attempting to encode a numpy array with 0 elements"),
so "no value" needs a sentinel, and NaN is one no real action or state can be
(robot samples are validated finite). `optional_array` maps it back to None.

Answers holding points or boxes (RoboPoint, RefCOCO) are kept as text.
Actions are stored raw (unnormalised); `stats.json` beside the shards holds
their statistics. This module defines the format; it never reads a dataset.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vla_scale.data.camera_images import (LEGACY_WRIST_COLUMN, PRIMARY_CAMERA, camera_column, decode_camera_image,
                                          rgb_image)
from vla_scale.errors import DataError

COLUMNS: dict[str, str] = {
    "task": "str",
    "dataset": "str",
    "image": "bytes",
    "wrist_image": "bytes",
    "instruction": "str",
    "action": "ndarray:float32",
    "state": "ndarray:float32",
    "episode": "int64",
    "step": "int64",
    "turns": "json",
}
ROBOT_TASK = "robot"
VL_TASKS = ("vqa", "spatial", "affordance")
TASKS = (ROBOT_TASK, *VL_TASKS)
STATS_FILE = "stats.json"
# MDS cannot encode empty arrays (see the module docstring): "no value" is [nan].
ABSENT = np.full((1,), np.nan, dtype=np.float32)


# -- cameras: column names and decoding live in vla_scale.data.camera_images ------------------------
def camera_image(sample: dict[str, Any], name: str, where: str = "sample") -> Any:
    """Camera `name` of a read row as an RGB PIL image, or None when the row does not have it (a camera
    column it lacks, b"" as in a text-only VL sample). The wrist camera of older shards is `wrist_image`."""
    value = sample.get(camera_column(name))
    if value is None and name == "wrist":
        value = sample.get(LEGACY_WRIST_COLUMN)
    return decode_camera_image(value, f"{where} (camera {name!r})")


def is_absent(array: Any) -> bool:
    """True for the ABSENT sentinel ([nan]) and for empty arrays."""
    arr = np.asarray(array)
    return arr.size == 0 or (arr.size == 1 and bool(np.isnan(arr.reshape(-1)[0])))


def optional_array(array: Any) -> np.ndarray | None:
    """A stored action/state column as an array, or None when it holds ABSENT."""
    return None if is_absent(array) else np.asarray(array)


def _camera(image: Any, where: str, required: bool = False) -> Any:
    """A camera value as written: encoded bytes stay bytes (the writer keeps or re-encodes them), pixels are
    checked and become an RGB image (the writer encodes them with its codec)."""
    if image is None or (isinstance(image, (bytes, bytearray, memoryview)) and not len(image)):
        if required:
            raise DataError(f"{where}: the image is missing")
        return b""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return rgb_image(image, where)


def robot_sample(*, image: Any, instruction: str, action: Any, dataset: str, episode: int, step: int,
                 wrist_image: Any = None, state: Any = None, cameras: dict[str, Any] | None = None,
                 where: str = "sample") -> dict[str, Any]:
    """A validated robot row. Non-finite actions are an error naming `where`.

    `cameras`: the other cameras by name (not the primary); "wrist" is stored in the `wrist_image`
    column every shard has, any other camera N in the column `image_N`."""
    act = np.asarray(action, dtype=np.float32)
    if act.ndim not in (1, 2) or act.size == 0:
        raise DataError(f"{where}: action must have shape (D,) or (T, D), got {act.shape}")
    bad = ~np.isfinite(act)
    if bad.any():
        idx = np.argwhere(bad)[0].tolist()
        raise DataError(f"{where}: action has a non-finite value {act[tuple(idx)]} at index {idx}")
    st = None if state is None else np.asarray(state, dtype=np.float32).reshape(-1)
    if st is not None and not np.all(np.isfinite(st)):
        raise DataError(f"{where}: proprioceptive state has a non-finite value")
    st = ABSENT if st is None or st.size == 0 else st
    extra = {}
    for name, img in (cameras or {}).items():
        if name == PRIMARY_CAMERA:
            raise DataError(f"{where}: the primary camera goes in image=, not in cameras=")
        if name == "wrist":
            if wrist_image is not None:
                raise DataError(f"{where}: the wrist camera is given twice (wrist_image= and cameras=)")
            wrist_image = img
        else:
            extra[camera_column(name)] = _camera(img, f"{where} (camera {name!r})", required=True)
    return {**extra, "task": ROBOT_TASK, "dataset": dataset, "image": _camera(image, where, required=True),
            "wrist_image": _camera(wrist_image, where + " (wrist)"),
            "instruction": str(instruction), "action": act, "state": st, "episode": int(episode),
            "step": int(step), "turns": []}


def vl_sample(*, image: Any, turns: Sequence[dict[str, str]], task: str, dataset: str,
              where: str = "sample") -> dict[str, Any]:
    """A validated VL row; `image=None` for a text-only sample (the model then has no image prefix)."""
    if task not in VL_TASKS:
        raise DataError(f"{where}: task {task!r} is not one of {list(VL_TASKS)}")
    clean = []
    for k, t in enumerate(turns):
        q, a = t.get("question"), t.get("answer")
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            raise DataError(f"{where}: turn {k} needs a non-empty question and answer, got {t!r}")
        clean.append({"question": q, "answer": a})
    if not clean:
        raise DataError(f"{where}: no question/answer turns")
    return {"task": task, "dataset": dataset, "image": _camera(image, where), "wrist_image": b"",
            "instruction": "", "action": ABSENT, "state": ABSENT, "episode": -1, "step": -1, "turns": clean}
