"""The shard schema: one MDS column set for every co-training sample.

Robot and vision-language samples share one set of columns so that any mix
of sources can be read by one `StreamingDataset`; columns a kind does not
use hold empty values. Shards are plain mosaicml-streaming MDS: readable by
`streaming.StreamingDataset(local=...)` with no code of ours.

| column       | MDS encoding     | robot                               | vision-language                         |
|--------------|------------------|-------------------------------------|-----------------------------------------|
| task         | str              | "robot"                             | "vqa", "spatial" or "affordance"        |
| dataset      | str              | source dataset name                 | source dataset name                     |
| image        | jpeg             | primary camera, RGB                 | the image (1x1 black: text-only sample) |
| wrist_image  | bytes            | JPEG bytes of the wrist camera, or b"" | b""                                  |
| image_<name> | (camera)         | camera <name> (data.cameras)        | ABSENT column                           |
| instruction  | str              | language instruction                | ""                                      |
| action       | ndarray:float32  | (D,) or an action chunk (T, D)      | ABSENT                                  |
| state        | ndarray:float32  | proprioception (S,), or ABSENT      | ABSENT                                  |
| episode      | int64            | episode index within the dataset    | -1                                      |
| step         | int64            | step index within the episode       | -1                                      |
| turns        | json             | []                                  | [{"question": ..., "answer": ...}, ...] |

ABSENT is the one-element array [nan]: MDS cannot store an empty ndarray
(`MDSWriter` raises "Attempting to encode a numpy array with 0 elements"),
so "no value" needs a sentinel, and NaN is one no real action or state can be
(robot samples are validated finite). `optional_array` maps it back to None.

Answers holding points or boxes (RoboPoint, RefCOCO) are kept as text.
Actions are stored raw (unnormalised); `stats.json` beside the shards holds
their statistics. This module defines the format; it never reads a dataset.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image

from vla_scale.errors import DataError

COLUMNS: dict[str, str] = {
    "task": "str",
    "dataset": "str",
    "image": "jpeg",
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
JPEG_QUALITY = 95
# MDS cannot encode empty arrays (see the module docstring): "no value" is [nan].
ABSENT = np.full((1,), np.nan, dtype=np.float32)


# -- cameras ---------------------------------------------------------------------------------------
# The primary camera is the `image` column; any other camera N is `image_N` (data.cameras names them).
# Shards written before named cameras hold the wrist camera as JPEG bytes in `wrist_image`.
PRIMARY_CAMERA = "primary"
LEGACY_WRIST = ("wrist", "wrist_image")


def camera_column(name: str) -> str:
    return "image" if name == PRIMARY_CAMERA else f"image_{name}"


def has_image(value: Any) -> bool:
    """False for "no image": None, b"", or the 1x1 placeholder a jpeg column holds for a text-only sample."""
    if value is None:
        return False
    if isinstance(value, (bytes, bytearray)):
        return len(value) > 0
    if isinstance(value, Image.Image):
        return value.size != NO_IMAGE_SIZE
    return True


def camera_image(sample: dict[str, Any], name: str, where: str = "sample") -> Image.Image | None:
    """Camera `name` of a read row as an RGB image, or None when the row does not have it."""
    value = sample.get(camera_column(name))
    if value is None and name == LEGACY_WRIST[0]:
        value = sample.get(LEGACY_WRIST[1])
    if not has_image(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(value)) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: camera {name!r} cannot be decoded: {e}") from None
    return _rgb(value, f"{where} (camera {name!r})")


# MDS's jpeg column cannot be empty: a text-only VL row stores this 1x1 black image, which no camera
# produces, and `has_image` reads it as "no image".
NO_IMAGE_SIZE = (1, 1)


def no_image() -> Image.Image:
    return Image.new("RGB", NO_IMAGE_SIZE)


def is_absent(array: Any) -> bool:
    """True for the ABSENT sentinel ([nan]) and for empty arrays."""
    arr = np.asarray(array)
    return arr.size == 0 or (arr.size == 1 and bool(np.isnan(arr.reshape(-1)[0])))


def optional_array(array: Any) -> np.ndarray | None:
    """A stored action/state column as an array, or None when it holds ABSENT."""
    return None if is_absent(array) else np.asarray(array)


def _rgb(image: Any, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"{where}: expected an RGB uint8 image (H, W, 3), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def jpeg_bytes(image: Any, where: str = "image") -> bytes:
    buf = io.BytesIO()
    _rgb(image, where).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def robot_sample(*, image: Any, instruction: str, action: Any, dataset: str, episode: int, step: int,
                 wrist_image: Any = None, state: Any = None, cameras: dict[str, Any] | None = None,
                 where: str = "sample") -> dict[str, Any]:
    """A validated robot row. Non-finite actions are an error naming `where`.

    `cameras`: the other cameras by name (not the primary); "wrist" is stored in the `wrist_image`
    column every shard has, any other camera N in a column `image_N` (which the writer must declare)."""
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
        if name == LEGACY_WRIST[0]:
            if wrist_image is not None:
                raise DataError(f"{where}: the wrist camera is given twice (wrist_image= and cameras=)")
            wrist_image = img
        else:
            extra[camera_column(name)] = _rgb(img, f"{where} (camera {name!r})")
    return {**extra, "task": ROBOT_TASK, "dataset": dataset, "image": _rgb(image, where),
            "wrist_image": b"" if wrist_image is None else jpeg_bytes(wrist_image, where + " (wrist)"),
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
    return {"task": task, "dataset": dataset, "image": no_image() if image is None else _rgb(image, where),
            "wrist_image": b"",
            "instruction": "", "action": ABSENT, "state": ABSENT, "episode": -1, "step": -1, "turns": clean}
