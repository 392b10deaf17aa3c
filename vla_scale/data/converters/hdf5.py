"""robomimic / LIBERO HDF5 demonstrations -> robot shards.

Layout (robomimic, which LIBERO follows):
  data/demo_N/actions            (T, D) float
  data/demo_N/obs/<camera>       (T, H, W, 3) uint8, e.g. agentview_rgb / eye_in_hand_rgb (LIBERO),
                                 agentview_image / robot0_eye_in_hand_image (robomimic)
  data/demo_N/obs/<state keys>   (T, k) float, e.g. ee_states + gripper_states (LIBERO),
                                 robot0_eef_pos + robot0_eef_quat + robot0_gripper_qpos (robomimic)
Language: --instruction when given (it overrides everything), else the first
found of a "language_instruction"/"lang"/"language" attribute on the demo or
on data, data.attrs["problem_info"] (LIBERO: JSON with
"language_instruction"), then the file name (LIBERO:
"KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5" -> "turn on the stove").

LIBERO renders its cameras upside down (rotated 180 degrees); pass
flip_images=True (--flip-images) to rotate them upright, as OpenVLA's LIBERO
regeneration does (img[::-1, ::-1]). The flag is off by default because
robomimic images are already upright.

SRC may be one file or a folder of *.hdf5 files (a LIBERO suite); episode
ids run across files in sorted order. Frames are read one at a time from
the file, so memory holds one episode of encoded frames. Never writes to SRC.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from vla_scale.data.converters.common import (BadSampleError, PendingEpisode, ProgressCallback, RobotEpisode,
                                              dataset_name_for, encode_frame, write_robot_episodes)
from vla_scale.data.camera_images import DEFAULT_CODEC, ImageCodec
from vla_scale.data.writer import DEFAULT_SIZE_LIMIT, ShardWriter, check_output
from vla_scale.errors import DataError

_CAMERA_DEFAULTS = ("agentview_rgb", "agentview_image")
# Used when state_keys is None and all keys of a group exist; the first complete group wins.
_STATE_DEFAULTS = (("ee_states", "gripper_states"), ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"))


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def instruction_from_filename(path: str | Path) -> str:
    """LIBERO names files after the task: "LIVING_ROOM_SCENE2_pick_up_the_ketchup_demo.hdf5" -> "pick up the ketchup"."""
    words = Path(path).stem.split("_")
    if words and words[-1].lower() == "demo":
        words = words[:-1]
    while words and words[0].isupper():  # scene prefix: KITCHEN, SCENE3, LIVING, ROOM ...
        words = words[1:]
    return " ".join(w for w in words if w)


def _attr_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        return _attr_text(value.reshape(-1)[0])
    if isinstance(value, (list, tuple)):  # some LIBERO exports store the instruction as a list of pieces
        value = "".join(str(v) for v in value)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _instruction(data, demo, path: Path, override: str | None) -> str | None:
    if override:
        return override
    for attrs in (demo.attrs, data.attrs):
        for key in ("language_instruction", "lang", "language"):
            text = _attr_text(attrs.get(key))
            if text:
                return text
    info = _attr_text(data.attrs.get("problem_info"))
    if info:
        try:
            text = _attr_text(json.loads(info).get("language_instruction"))
        except (json.JSONDecodeError, AttributeError):
            text = None
        if text:
            return text
    return instruction_from_filename(path) or None


def _image_keys(obs) -> list[str]:
    return [k for k in obs if getattr(obs[k], "ndim", 0) == 4 and obs[k].shape[-1] == 3 and obs[k].dtype == np.uint8]


def _source_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        files = sorted([*src.glob("*.hdf5"), *src.glob("*.h5")], key=lambda p: _natural_key(p.name))
        if files:
            return files
        raise DataError(f"{src}: no *.hdf5 or *.h5 files in this folder")
    raise DataError(f"HDF5 source {src} does not exist")


def _frames(ds, steps: int, flip: bool, where: str, codec: ImageCodec) -> list[bytes]:
    out = []
    for t in range(min(steps, ds.shape[0])):  # one frame at a time: an episode is never fully decoded in memory
        frame = ds[t]
        out.append(encode_frame(frame[::-1, ::-1] if flip else frame, f"{where}, step {t}", codec))
    return out


def _pending(files: list[Path], *, camera: str | None, wrist_camera: str | None, state_keys: Sequence[str] | None,
             flip_images: bool, instruction: str | None, codec: ImageCodec = DEFAULT_CODEC) -> Iterator[PendingEpisode]:
    import h5py

    episode = 0
    for path in files:
        try:
            h5 = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path}: cannot open it as HDF5: {e}") from None
        with h5:
            if "data" not in h5:
                raise DataError(f"{path}: no 'data' group; expected the robomimic layout data/demo_N/...")
            data = h5["data"]
            for name in sorted(data.keys(), key=_natural_key):
                demo = data[name]
                if not isinstance(demo, h5py.Group):
                    continue
                steps = int(demo["actions"].shape[0]) if "actions" in demo else None
                yield PendingEpisode(f"{path}: {name}", steps,
                                     _loader(path, data, demo, name, episode, camera=camera, wrist_camera=wrist_camera,
                                             state_keys=state_keys, flip_images=flip_images, instruction=instruction,
                                             codec=codec))
                episode += 1


def _loader(path: Path, data, demo, name: str, episode: int, *, camera, wrist_camera, state_keys, flip_images,
            instruction, codec: ImageCodec):
    where = f"{path}: {name}"

    def load() -> RobotEpisode:
        if "actions" not in demo:
            raise BadSampleError("missing key", f"{where}: no 'actions' dataset")
        actions = np.asarray(demo["actions"][()], dtype=np.float32)
        if actions.ndim == 1:
            actions = actions[:, None]
        steps = actions.shape[0]
        obs = demo.get("obs")
        if obs is None:
            raise BadSampleError("missing key", f"{where}: no 'obs' group")
        images = _image_keys(obs)
        cam = camera or next((k for k in _CAMERA_DEFAULTS if k in images), images[0] if images else None)
        if cam is None or cam not in obs:
            raise BadSampleError("missing image", f"{where}: no camera {cam!r} in obs; image observations: {images}")
        if wrist_camera and wrist_camera not in obs:
            raise BadSampleError("missing image", f"{where}: no wrist camera {wrist_camera!r} in obs; image "
                                                  f"observations: {images}")
        for key in [cam] + ([wrist_camera] if wrist_camera else []):
            if obs[key].shape[0] != steps:
                raise BadSampleError("length mismatch", f"{where}, step {min(obs[key].shape[0], steps)}: obs/{key} "
                                                        f"has {obs[key].shape[0]} frames for {steps} actions")
        keys = state_keys
        if keys is None:
            keys = next((g for g in _STATE_DEFAULTS if all(k in obs for k in g)), ())
        states = None
        if keys:
            parts = []
            for k in keys:
                if k not in obs:
                    raise BadSampleError("missing key", f"{where}: no state key obs/{k}; obs keys: {list(obs)}")
                v = np.asarray(obs[k][()], dtype=np.float32)
                if v.shape[0] != steps:
                    raise BadSampleError("length mismatch", f"{where}, step {min(v.shape[0], steps)}: obs/{k} has "
                                                            f"{v.shape[0]} rows for {steps} actions")
                parts.append(v.reshape(steps, -1))
            states = np.concatenate(parts, axis=1)
        text = _instruction(data, demo, path, instruction)
        if not text:
            raise BadSampleError("no instruction", f"{where}: no language instruction (attribute or file name)")
        return RobotEpisode(where=where, episode=episode, actions=actions, states=states, instructions=[text] * steps,
                            images=_frames(obs[cam], steps, flip_images, where, codec),
                            wrist_images=_frames(obs[wrist_camera], steps, flip_images, where, codec) if wrist_camera
                            else None,
                            images_verified=True)

    return load


def convert_hdf5(src: str | Path, out: str | Path, *, camera: str | None = None, wrist_camera: str | None = None,
                 state_keys: Sequence[str] | None = None, flip_images: bool = False, instruction: str | None = None,
                 dataset_name: str | None = None, skip_bad: bool = False, overwrite: bool = False,
                 size_limit: int | str | None = DEFAULT_SIZE_LIMIT, compression: str | None = None,
                 progress: bool = True, callback: ProgressCallback | None = None,
                 codec: ImageCodec | None = None) -> dict[str, Any]:
    """Convert robomimic/LIBERO HDF5 file(s) to robot shards in OUT; returns the summary.

    camera: primary image obs key (default agentview_rgb, agentview_image, or the
    first (T, H, W, 3) uint8 obs); wrist_camera: e.g. eye_in_hand_rgb; state_keys:
    obs keys concatenated into the state (default: LIBERO's ee_states +
    gripper_states or robomimic's eef pos/quat/gripper when present; () for
    none); flip_images: rotate frames 180 degrees (LIBERO); instruction: one
    instruction for every episode, overriding attributes and file names.
    """
    src = Path(src)
    files = _source_files(src)
    check_output(out, overwrite)
    name = dataset_name_for(src, dataset_name)
    total = 0
    try:
        import h5py

        for f in files:
            with h5py.File(f, "r") as h5:
                total += len(h5["data"].keys()) if "data" in h5 else 0
    except OSError:
        total = None  # the loop below names the unreadable file
    meta = {"kind": "hdf5", "source": str(src.resolve()), "dataset": name, "camera": camera,
            "wrist_camera": wrist_camera, "flip_images": flip_images}
    codec = codec or DEFAULT_CODEC
    with ShardWriter(out, overwrite=overwrite, size_limit=size_limit, compression=compression, metadata=meta,
                     codec=codec) as writer:
        write_robot_episodes(writer, _pending(files, camera=camera, wrist_camera=wrist_camera, state_keys=state_keys,
                                              flip_images=flip_images, instruction=instruction, codec=codec),
                             dataset=name, skip_bad=skip_bad, total=total, progress=progress, callback=callback)
    return writer.summary
