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
"language_instruction"), data.attrs["env_args"] or the demo's "ep_meta"
(robomimic / robocasa JSON; a "lang"/"language_instruction" entry, also under
"env_kwargs"). Otherwise the conversion stops with an error saying so: the file
name is used only when asked (instruction_from_filename, --instruction-from-filename:
LIBERO names files after the task, "KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5" ->
"turn on the stove"), since for robomimic it is not an instruction ("image_v141").

filter_key (--filter-key train|valid|...): only the demos listed in the file's
mask/<key> dataset (robomimic's train/validation splits), in file order.

LIBERO renders its cameras upside down (rotated 180 degrees) and says so: its
files carry data.attrs["macros_image_convention"] = "opengl". flip_images=None
(the default) rotates them upright exactly then, as OpenVLA's LIBERO
regeneration does (img[::-1, ::-1]); True/False force it either way.

Cameras: the primary (camera, default agentview_rgb / agentview_image), the
wrist (wrist_camera, default eye_in_hand_rgb / robot0_eye_in_hand_image when
present: LIBERO's and robomimic's second camera), and any other obs key by
name (cameras={"left": "left_rgb"}, --extra-camera left=left_rgb), stored as
camera columns (`vla_scale.data.schema`). A chunk of a dataset that cannot be
read (a corrupt HDF5 chunk) stops the conversion, also with --skip-bad, with an
error naming file, demo and step.

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
_WRIST_DEFAULTS = ("eye_in_hand_rgb", "robot0_eye_in_hand_image")
_LANGUAGE_KEYS = ("language_instruction", "lang", "language", "instruction")
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


def _json_text(value: Any) -> str | None:
    """A language entry of a JSON attribute (LIBERO problem_info, robomimic env_args, robocasa ep_meta)."""
    raw = _attr_text(value)
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    for node in (obj, obj.get("env_kwargs") if isinstance(obj, dict) else None):
        if isinstance(node, dict):
            for key in _LANGUAGE_KEYS:
                text = _attr_text(node.get(key))
                if text:
                    return text
    return None


def _instruction(data, demo, path: Path, override: str | None, from_filename: bool = False) -> str | None:
    if override:
        return override
    for attrs in (demo.attrs, data.attrs):
        for key in _LANGUAGE_KEYS:
            text = _attr_text(attrs.get(key))
            if text:
                return text
    for attrs, key in ((data.attrs, "problem_info"), (data.attrs, "env_args"), (demo.attrs, "ep_meta")):
        text = _json_text(attrs.get(key))
        if text:
            return text
    return (instruction_from_filename(path) or None) if from_filename else None


def _flip(data, flip_images: bool | None) -> bool:
    """flip_images as given, or (None) whether the file says its images follow OpenGL's bottom-up convention."""
    if flip_images is not None:
        return bool(flip_images)
    return (_attr_text(data.attrs.get("macros_image_convention")) or "").lower() == "opengl"


def _demo_names(path: Path, h5, data, filter_key: str | None) -> list[str]:
    names = sorted((k for k in data.keys()), key=_natural_key)
    if filter_key is None:
        return names
    mask = h5.get("mask")
    if mask is None or filter_key not in mask:
        have = sorted(mask.keys()) if mask is not None else []
        raise DataError(f"{path}: --filter-key {filter_key!r} is not in the file's mask/ group (filter keys: "
                        f"{have or 'none: the file has no mask/ group'})")
    listed = [_attr_text(v) or "" for v in np.asarray(mask[filter_key][()]).reshape(-1)]
    missing = [n for n in listed if n not in data]
    if missing:
        raise DataError(f"{path}: mask/{filter_key} lists demos that are not in data/: {missing[:5]}")
    keep = set(listed)
    return [n for n in names if n in keep]


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


def _read_rows(ds, where: str, key: str, t: int | None = None) -> np.ndarray:
    """ds[t] (or all of ds), with an unreadable chunk reported by file, demo and step, never a bare OSError."""
    try:
        return ds[()] if t is None else ds[t]
    except (OSError, RuntimeError, ValueError) as e:
        if t is None:  # find the first unreadable step, so the message can name it
            for k in range(ds.shape[0]):
                _read_rows(ds, where, key, k)
        step = "" if t is None else f", step {t}"
        raise DataError(f"{where}{step}: cannot read {key} (a corrupt HDF5 chunk?): {e}") from None


def _frames(ds, steps: int, flip: bool, where: str, key: str, codec: ImageCodec) -> list[bytes]:
    out = []
    for t in range(min(steps, ds.shape[0])):  # one frame at a time: an episode is never fully decoded in memory
        frame = _read_rows(ds, where, f"obs/{key}", t)
        out.append(encode_frame(frame[::-1, ::-1] if flip else frame, f"{where}, step {t}", codec))
    return out


def _pending(files: list[Path], *, camera: str | None, wrist_camera: str | None, state_keys: Sequence[str] | None,
             flip_images: bool | None, instruction: str | None, cameras: dict[str, str] | None = None,
             filter_key: str | None = None, instruction_from_filename: bool = False,
             codec: ImageCodec = DEFAULT_CODEC) -> Iterator[PendingEpisode]:
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
            flip = _flip(data, flip_images)
            for name in _demo_names(path, h5, data, filter_key):
                demo = data[name]
                if not isinstance(demo, h5py.Group):
                    continue
                steps = int(demo["actions"].shape[0]) if "actions" in demo else None
                text = _instruction(data, demo, path, instruction, instruction_from_filename)
                if not text:  # a property of the file, not of one demo: never skipped, never guessed
                    raise DataError(f"{path}: {name}: no language instruction (no language_instruction/lang "
                                    f"attribute, none in problem_info, env_args or ep_meta); pass --instruction "
                                    f"TEXT, or --instruction-from-filename when the file is named after its task "
                                    f"(LIBERO)")
                yield PendingEpisode(f"{path}: {name}", steps,
                                     _loader(path, data, demo, name, episode, camera=camera, wrist_camera=wrist_camera,
                                             state_keys=state_keys, flip_images=flip, instruction=text,
                                             cameras=cameras or {}, codec=codec))
                episode += 1


def _loader(path: Path, data, demo, name: str, episode: int, *, camera, wrist_camera, state_keys, flip_images,
            instruction, cameras, codec: ImageCodec):
    where = f"{path}: {name}"

    def load() -> RobotEpisode:
        if "actions" not in demo:
            raise BadSampleError("missing key", f"{where}: no 'actions' dataset")
        actions = np.asarray(_read_rows(demo["actions"], where, "actions"), dtype=np.float32)
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
        wrist = wrist_camera if wrist_camera is not None else next((k for k in _WRIST_DEFAULTS if k in images), None)
        for cam_name, key in cameras.items():
            if key not in obs:
                raise BadSampleError("missing image", f"{where}: no camera {cam_name!r} (obs/{key}); image "
                                                      f"observations: {images}")
        for key in [cam] + ([wrist] if wrist else []) + list(cameras.values()):
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
                v = np.asarray(_read_rows(obs[k], where, f"obs/{k}"), dtype=np.float32)
                if v.shape[0] != steps:
                    raise BadSampleError("length mismatch", f"{where}, step {min(v.shape[0], steps)}: obs/{k} has "
                                                            f"{v.shape[0]} rows for {steps} actions")
                parts.append(v.reshape(steps, -1))
            states = np.concatenate(parts, axis=1)
        return RobotEpisode(where=where, episode=episode, actions=actions, states=states,
                            instructions=[instruction] * steps,
                            images=_frames(obs[cam], steps, flip_images, where, cam, codec),
                            wrist_images=_frames(obs[wrist], steps, flip_images, where, wrist, codec) if wrist else None,
                            cameras={n: _frames(obs[k], steps, flip_images, where, k, codec) for n, k in cameras.items()},
                            images_verified=True)

    return load


def convert_hdf5(src: str | Path, out: str | Path, *, camera: str | None = None, wrist_camera: str | None = None,
                 state_keys: Sequence[str] | None = None, flip_images: bool | None = None,
                 instruction: str | None = None, cameras: dict[str, str] | None = None,
                 filter_key: str | None = None, instruction_from_filename: bool = False,
                 dataset_name: str | None = None, skip_bad: bool = False, overwrite: bool = False,
                 size_limit: int | str | None = DEFAULT_SIZE_LIMIT, compression: str | None = None,
                 progress: bool = True, callback: ProgressCallback | None = None,
                 codec: ImageCodec | None = None) -> dict[str, Any]:
    """Convert robomimic/LIBERO HDF5 file(s) to robot shards in OUT; returns the summary.

    camera: primary image obs key (default agentview_rgb, agentview_image, or the
    first (T, H, W, 3) uint8 obs); wrist_camera: e.g. eye_in_hand_rgb (default: that or
    robot0_eye_in_hand_image when present; "" for none); cameras: more cameras, {name: obs key};
    filter_key: convert only the demos of mask/<filter_key>; state_keys:
    obs keys concatenated into the state (default: LIBERO's ee_states +
    gripper_states or robomimic's eef pos/quat/gripper when present; () for
    none); flip_images: rotate frames 180 degrees (None: when the file says its images are
    "opengl", as LIBERO's do); instruction: one instruction for every episode, overriding
    attributes; instruction_from_filename: fall back to the file name (LIBERO naming).
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
    for cam_name in cameras or {}:
        if not cam_name.isidentifier() or cam_name in ("primary", "wrist"):
            raise DataError(f"camera name {cam_name!r}: use an identifier other than 'primary' and 'wrist' (those are "
                            f"--camera and --wrist-camera)")
    meta = {"kind": "hdf5", "source": str(src.resolve()), "dataset": name, "camera": camera,
            "wrist_camera": wrist_camera, "cameras": dict(cameras or {}), "flip_images": flip_images,
            "filter_key": filter_key}
    codec = codec or DEFAULT_CODEC
    with ShardWriter(out, overwrite=overwrite, size_limit=size_limit, compression=compression, metadata=meta,
                     codec=codec, cameras=list(cameras or {})) as writer:
        write_robot_episodes(writer, _pending(files, camera=camera, wrist_camera=wrist_camera, state_keys=state_keys,
                                              flip_images=flip_images, instruction=instruction, cameras=cameras,
                                              filter_key=filter_key,
                                              instruction_from_filename=instruction_from_filename, codec=codec),
                             dataset=name, skip_bad=skip_bad, total=total, progress=progress, callback=callback)
    return writer.summary
