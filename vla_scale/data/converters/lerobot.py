"""LeRobotDataset folder (codebase v2.x and v3.0, local disk) -> robot shards.

Layouts, as written by huggingface/lerobot (checked against its source:
`datasets/utils.py`, `io_utils.py`, `dataset_metadata.py`, `dataset_reader.py`
and the `v30/convert_dataset_v21_to_v30.py` conversion script):

v2.0 / v2.1 (`meta/info.json` "codebase_version": "v2.1")
  data_path   "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet", one episode per file,
              episode_chunk = episode_index // info["chunks_size"]
  video_path  "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4", one per episode
  meta/episodes.jsonl  {"episode_index", "tasks": [str], "length"}
  meta/tasks.jsonl     {"task_index", "task"}
v3.0
  data_path   "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet", many episodes per file
  video_path  "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4", many episodes
              concatenated; an episode's frame at data timestamp t is at from_timestamp + t
  meta/episodes/chunk-*/file-*.parquet  episode_index, tasks, length, data/chunk_index, data/file_index,
              dataset_from_index, dataset_to_index, videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}
  meta/tasks.parquet   task_index, with the task string as the (pandas) index, stored as a column
              "task" (or "__index_level_0__" when the index had no name)
Frame columns (both): action, observation.state, observation.images.* (dtype "image": a struct
{bytes, path}; dtype "video": nothing in parquet), timestamp, frame_index, episode_index, index, task_index.

Data files are read batch by batch and split into episodes as they go, so
memory holds one episode (its rows, and its frames as encoded images), never a
file or the dataset. Video frames are decoded with PyAV: for each step the
frame whose presentation time is nearest the query time, and an error when the
nearest is further than `video_tolerance_s` (a missing or dropped frame).
This module never downloads anything: the folder must be on local disk.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vla_scale.data.converters.common import (BadSampleError, PendingEpisode, ProgressCallback, RobotEpisode,
                                              dataset_name_for, encode_frame, write_robot_episodes)
from vla_scale.data.camera_images import DEFAULT_CODEC, ImageCodec
from vla_scale.data.writer import DEFAULT_SIZE_LIMIT, ShardWriter, check_output
from vla_scale.errors import DataError

_V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
_V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
_V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
_V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
_BATCH_ROWS = 512  # parquet rows per read: bounded memory even for files holding thousands of episodes
_SEEK_AHEAD_S = 5.0  # decode forward through gaps shorter than this; seek past longer ones


# ---------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------
@dataclass
class _Episode:
    index: int
    length: int | None
    tasks: list[str]
    data_file: Path
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # key -> (file, from_timestamp)


@dataclass
class _Dataset:
    root: Path
    version: str  # "v2" or "v3"
    fps: float
    features: dict[str, dict[str, Any]]
    tasks: dict[int, str]
    episodes: list[_Episode]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is missing: is this a LeRobotDataset folder?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read it as JSON: {e}") from None


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {n}: not valid JSON: {e}") from None
    except FileNotFoundError:
        raise DataError(f"{path} is missing: a LeRobot v2 dataset lists its episodes and tasks there") from None


def _read_parquet_columns(path: Path, wanted: list[str]) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for corrupt files
        raise DataError(f"{path}: cannot read it as parquet: {e}") from None
    names = pf.schema_arrow.names
    table = pf.read(columns=[c for c in wanted if c in names])
    return {c: table.column(c).to_pylist() for c in table.column_names}


def _load_dataset(root: Path, info: dict[str, Any], video_keys: list[str]) -> _Dataset:
    version = str(info.get("codebase_version", ""))
    features = info.get("features") or {}
    if not isinstance(features, dict) or not features:
        raise DataError(f"{root / 'meta/info.json'}: no 'features'; cannot tell actions from images")
    fps = float(info.get("fps") or 0)
    if fps <= 0:
        raise DataError(f"{root / 'meta/info.json'}: 'fps' is missing or not positive")
    if version.startswith("v2"):
        return _load_v2(root, info, fps, features, video_keys)
    if version.startswith("v3"):
        return _load_v3(root, info, fps, features, video_keys)
    raise DataError(f"{root / 'meta/info.json'}: codebase_version {version!r} is not supported; expected v2.0, v2.1 "
                    f"or v3.0 (older datasets convert with lerobot's own scripts)")


def _load_v2(root: Path, info: dict, fps: float, features: dict, video_keys: list[str]) -> _Dataset:
    chunks = int(info.get("chunks_size") or 1000)
    data_path = info.get("data_path") or _V2_DATA_PATH
    video_path = info.get("video_path") or _V2_VIDEO_PATH
    tasks = {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(root / "meta" / "tasks.jsonl")}
    episodes = []
    for r in _read_jsonl(root / "meta" / "episodes.jsonl"):
        ep = int(r["episode_index"])
        chunk = ep // chunks
        fmt = {"episode_chunk": chunk, "episode_index": ep, "chunk_index": chunk}
        episodes.append(_Episode(
            index=ep, length=int(r["length"]) if r.get("length") is not None else None,
            tasks=[str(t) for t in (r.get("tasks") or [])], data_file=root / data_path.format(**fmt),
            videos={k: (root / video_path.format(video_key=k, **fmt), 0.0) for k in video_keys}))
    episodes.sort(key=lambda e: e.index)
    return _Dataset(root, "v2", fps, features, tasks, episodes)


def _load_v3(root: Path, info: dict, fps: float, features: dict, video_keys: list[str]) -> _Dataset:
    data_path = info.get("data_path") or _V3_DATA_PATH
    video_path = info.get("video_path") or _V3_VIDEO_PATH
    tasks_file = root / "meta" / "tasks.parquet"
    cols = _read_parquet_columns(tasks_file, ["task_index", "task", "__index_level_0__"])
    names = cols.get("task") or cols.get("__index_level_0__")
    if "task_index" not in cols or names is None:
        raise DataError(f"{tasks_file}: expected columns 'task_index' and 'task' (the task strings)")
    tasks = {int(i): str(t) for i, t in zip(cols["task_index"], names)}
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise DataError(f"{root / 'meta/episodes'} has no chunk-*/file-*.parquet: a LeRobot v3 dataset lists its "
                        f"episodes there")
    wanted = ["episode_index", "length", "tasks", "data/chunk_index", "data/file_index"]
    for k in video_keys:
        wanted += [f"videos/{k}/chunk_index", f"videos/{k}/file_index", f"videos/{k}/from_timestamp"]
    episodes = []
    for f in files:  # one row per episode, only the columns we need: small even for 100k episodes
        cols = _read_parquet_columns(f, wanted)
        missing = [c for c in wanted if c not in cols]
        if missing:
            raise DataError(f"{f}: missing columns {missing}")
        for i, ep in enumerate(cols["episode_index"]):
            fmt = {"chunk_index": cols["data/chunk_index"][i], "file_index": cols["data/file_index"][i]}
            videos = {}
            for k in video_keys:
                vfmt = {"chunk_index": cols[f"videos/{k}/chunk_index"][i], "file_index": cols[f"videos/{k}/file_index"][i]}
                videos[k] = (root / video_path.format(video_key=k, **vfmt),
                             float(cols[f"videos/{k}/from_timestamp"][i]))
            episodes.append(_Episode(index=int(ep), length=int(cols["length"][i]),
                                     tasks=[str(t) for t in (cols["tasks"][i] or [])],
                                     data_file=root / data_path.format(**fmt), videos=videos))
    episodes.sort(key=lambda e: e.index)
    return _Dataset(root, "v3", fps, features, tasks, episodes)


# ---------------------------------------------------------------------------------------------
# columns -> arrays
# ---------------------------------------------------------------------------------------------
def _matrix(column, name: str, where: str) -> np.ndarray:
    """A parquet column of equal-length float lists (or scalars) -> float32 (T, D)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    steps = len(arr)
    if arr.null_count:
        t = int(np.flatnonzero(~arr.is_valid().to_numpy(zero_copy_only=False))[0])
        raise BadSampleError("missing value", f"{where}, step {t}: {name} is missing (null)")
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
        if steps and (lengths != lengths[0]).any():
            t = int(np.flatnonzero(lengths != lengths[0])[0])
            raise BadSampleError("length mismatch", f"{where}, step {t}: {name} has {lengths[t]} values, "
                                                    f"step 0 has {lengths[0]}")
        values = arr.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slicing offsets
        dim = int(lengths[0]) if steps else 0
        return np.asarray(values, dtype=np.float32).reshape(steps, dim)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type):
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(steps, 1)
    raise DataError(f"{where}: column {name} has type {arr.type}; expected a list of numbers per step")


def _parquet_images(column, root: Path, where: str) -> list[bytes | None]:
    """An image column (HF `Image` struct {bytes, path}, or raw binary) -> encoded bytes per step."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return arr.to_pylist()
    if not pa.types.is_struct(arr.type):
        raise DataError(f"{where}: image column has type {arr.type}; expected a struct {{bytes, path}} or binary")
    out: list[bytes | None] = []
    for value in arr.to_pylist():
        data = (value or {}).get("bytes")
        if not data and (value or {}).get("path"):
            path = Path(value["path"])
            for candidate in (path, root / path):
                if candidate.is_file():
                    data = candidate.read_bytes()
                    break
        out.append(data or None)  # None: validation reports the step as a missing image
    return out


# ---------------------------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------------------------
class _VideoCursor:
    """Frames at requested times from one mp4 at a time; continues decoding forward when it can.

    LeRobot v3 packs consecutive episodes into one file, so episode k+1 starts
    where episode k ended: continuing the decoder avoids a seek and re-decoding
    the group of pictures for every episode.
    """

    def __init__(self, tolerance_s: float, codec: ImageCodec = DEFAULT_CODEC) -> None:
        self.tolerance_s = tolerance_s
        self.codec = codec  # frames are encoded once, in the shards' own codec
        self.path: Path | None = None
        self._container = None
        self._stream = None
        self._frames = None
        self._prev = None
        self._cur = None
        self._reformatter = None

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._frames = self._prev = self._cur = None
        self.path = None

    def _open(self, path: Path) -> None:
        import av

        self.close()
        self._container = av.open(str(path))
        if not self._container.streams.video:
            raise BadSampleError("undecodable video", f"{path}: no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        self.path = path
        if self._reformatter is None:
            from av.video.reformatter import VideoReformatter

            # One reformatter reused across frames: frame.to_ndarray(format=...) builds a new
            # swscale context per call, about 9x slower for the same pixels.
            self._reformatter = VideoReformatter()

    def _seek(self, t: float) -> None:
        tb = float(self._stream.time_base)
        self._container.seek(max(0, int((t - self.tolerance_s) / tb)), stream=self._stream, backward=True,
                             any_frame=False)
        # frames without a presentation time cannot be matched to a step; skip them
        self._frames = (f for f in self._container.decode(self._stream) if f.time is not None)
        self._prev, self._cur = None, next(self._frames, None)

    def frames_at(self, path: Path, times: np.ndarray, where: str) -> list[bytes]:
        import av

        if not path.is_file():
            raise BadSampleError("missing image", f"{where}: video file {path} is missing")
        try:
            if path != self.path:
                self._open(path)
                self._seek(float(times[0]))
            else:
                here = self._prev.time if self._prev is not None else (self._cur.time if self._cur is not None else None)
                if here is None or times[0] < here - self.tolerance_s or times[0] > here + _SEEK_AHEAD_S:
                    self._seek(float(times[0]))
            out = []
            for step, q in enumerate(times):
                while self._cur is not None and self._cur.time < q:
                    self._prev, self._cur = self._cur, next(self._frames, None)
                candidates = [f for f in (self._prev, self._cur) if f is not None]
                best = min(candidates, key=lambda f: abs(f.time - q)) if candidates else None
                if best is None or abs(best.time - q) > self.tolerance_s:
                    nearest = "none" if best is None else f"{best.time:.4f} s"
                    raise BadSampleError("missing image", f"{where}, step {step}: {path.name} has no frame within "
                                                          f"{self.tolerance_s:.4f} s of t={q:.4f} s (nearest: {nearest}); "
                                                          f"the video is shorter than the episode or out of sync")
                rgb = self._reformatter.reformat(best, format="rgb24").to_ndarray()
                out.append(encode_frame(rgb, f"{where}, step {step}", self.codec))
            return out
        except av.FFmpegError as e:
            self.close()
            raise BadSampleError("undecodable video", f"{where}: cannot decode {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# episodes
# ---------------------------------------------------------------------------------------------
def _pending_episodes(ds: _Dataset, *, action_key: str, state_key: str | None, cameras: dict[str, str],
                      video: dict[str, _VideoCursor]) -> Iterator[PendingEpisode]:
    """Walks the data files in order, splitting rows into episodes; yields each as a PendingEpisode."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_file: dict[Path, list[_Episode]] = {}
    for ep in ds.episodes:
        by_file.setdefault(ep.data_file, []).append(ep)
    for data_file, expected in by_file.items():
        meta = {e.index: e for e in expected}
        if not data_file.is_file():
            for e in expected:
                yield _failing(e, data_file, "missing file", f"{data_file}: episode {e.index}: the data file is missing")
            continue
        try:
            pf = pq.ParquetFile(data_file)
        except Exception as e:  # corrupt parquet: the whole file is unusable, never a silent skip
            raise DataError(f"{data_file}: cannot read it as parquet: {e}") from None
        names = pf.schema_arrow.names
        if action_key not in names:
            raise DataError(f"{data_file}: no {action_key!r} column (columns: {names}); pass --action-key")
        columns = [c for c in [action_key, state_key, "timestamp", "frame_index", "episode_index", "task_index",
                               *[k for k in cameras.values() if ds.features[k]["dtype"] != "video"]]
                   if c and c in names]
        seen: set[int] = set()
        current: int | None = None
        parts: list = []
        row = 0  # file row of the next batch, to name a corrupt page's episode and step
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # pyarrow's errors for a corrupt page (OSError, ArrowInvalid...): stop, never skip
                raise DataError(f"{data_file}: {_row_place(data_file, row, expected)}: cannot read the "
                                f"parquet data (a corrupt page?): {e}") from None
            row += batch.num_rows
            if "episode_index" in batch.schema.names:
                ids = np.asarray(batch.column("episode_index").to_numpy(zero_copy_only=False), dtype=np.int64)
            else:  # v2 files hold one episode and may omit the column
                ids = np.full(batch.num_rows, expected[0].index, dtype=np.int64)
            starts = np.flatnonzero(np.diff(ids)) + 1
            for lo, hi in zip(np.r_[0, starts], np.r_[starts, len(ids)]):
                ep = int(ids[lo])
                if ep != current:
                    if current is not None:
                        yield _episode(ds, data_file, meta, current, pa.Table.from_batches(parts), action_key,
                                       state_key, cameras, video)
                    if ep in seen:
                        raise DataError(f"{data_file}: rows of episode {ep} are not contiguous; the file is not "
                                        f"in LeRobot order")
                    seen.add(ep)
                    current, parts = ep, []
                parts.append(batch.slice(lo, hi - lo))
        if current is not None:
            yield _episode(ds, data_file, meta, current, pa.Table.from_batches(parts), action_key, state_key,
                           cameras, video)
        for e in expected:
            if e.index not in seen:
                yield _failing(e, data_file, "length mismatch",
                               f"{data_file}: episode {e.index}: listed in meta with {e.length} steps, but the data "
                               f"file has no rows for it")


def _row_place(data_file: Path, row: int, episodes: list[_Episode]) -> str:
    """ "episode E, step S" of a file row (from the episode_index column alone), or the row range."""
    import pyarrow.parquet as pq

    try:
        ids = pq.read_table(data_file, columns=["episode_index"]).column(0).to_numpy()
    except Exception:  # that column is unreadable too, or absent (a v2 file holds one episode)
        if len(episodes) == 1:
            return f"episode {episodes[0].index}, step {row} or later"
        return f"rows from {row} (episodes {episodes[0].index}-{episodes[-1].index})"
    if row >= len(ids):
        return f"row {row}"
    episode = int(ids[row])
    step = row - int(np.flatnonzero(ids == episode)[0])
    return f"episode {episode}, step {step} or later (rows from {row})"


def _failing(e: _Episode, data_file: Path, reason: str, message: str) -> PendingEpisode:
    def load() -> RobotEpisode:
        raise BadSampleError(reason, message)

    return PendingEpisode(f"{data_file}: episode {e.index}", e.length, load)


def _episode(ds: _Dataset, data_file: Path, meta: dict[int, _Episode], index: int, rows, action_key: str,
             state_key: str | None, cameras: dict[str, str], video: dict[str, _VideoCursor]) -> PendingEpisode:
    """`cameras`: camera name ("primary", "wrist", others) -> image/video feature key."""
    where = f"{data_file}: episode {index}"
    ep = meta.get(index)
    names = list(cameras)

    def load() -> RobotEpisode:
        if ep is None:
            raise BadSampleError("length mismatch", f"{where}: the data file has rows for this episode but the "
                                                    f"dataset's meta/episodes does not list it here")
        steps = rows.num_rows
        if ep.length is not None and ep.length != steps:
            raise BadSampleError("length mismatch", f"{where}: meta lists {ep.length} steps, the data file has "
                                                    f"{steps} rows")
        actions = _matrix(rows.column(action_key), action_key, where)
        states = _matrix(rows.column(state_key), state_key, where) if state_key in rows.column_names else None
        if "timestamp" in rows.column_names:
            times = np.asarray(rows.column("timestamp").to_numpy(zero_copy_only=False), dtype=np.float64)
        elif "frame_index" in rows.column_names:
            times = np.asarray(rows.column("frame_index").to_numpy(zero_copy_only=False), dtype=np.float64) / ds.fps
        else:
            times = np.arange(steps, dtype=np.float64) / ds.fps
        if steps > 1 and (np.diff(times) <= 0).any():
            t = int(np.flatnonzero(np.diff(times) <= 0)[0]) + 1
            raise BadSampleError("bad timestamps", f"{where}, step {t}: timestamps do not increase "
                                                   f"({times[t - 1]} then {times[t]})")
        instructions = _instructions(ds, rows, ep, where)
        images = []
        for key in cameras.values():
            if ds.features[key]["dtype"] == "video":
                path, offset = ep.videos[key]
                images.append(video[key].frames_at(path, times + offset, f"{where} ({key})"))
            else:
                images.append(_parquet_images(rows.column(key), ds.root, f"{where} ({key})"))
        named = dict(zip(names, images))
        return RobotEpisode(where=where, episode=index, actions=actions, states=states, instructions=instructions,
                            images=named["primary"], wrist_images=named.get("wrist"),
                            cameras={n: v for n, v in named.items() if n not in ("primary", "wrist")})

    return PendingEpisode(where, ep.length if ep is not None else None, load)


def _instructions(ds: _Dataset, rows, ep: _Episode, where: str) -> list[str]:
    steps = rows.num_rows
    if "task_index" in rows.column_names:
        out = []
        for t, i in enumerate(rows.column("task_index").to_pylist()):
            task = ds.tasks.get(int(i)) if i is not None else None
            if task is None:
                raise BadSampleError("no instruction", f"{where}, step {t}: task_index {i} is not in the dataset's "
                                                       f"tasks")
            out.append(task)
        return out
    if ep.tasks:
        return [ep.tasks[0]] * steps
    raise BadSampleError("no instruction", f"{where}: no task_index column and no tasks in meta: no instruction")


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def convert_lerobot(src: str | Path, out: str | Path, *, camera: str | None = None, wrist_camera: str | None = None,
                    action_key: str = "action", state_key: str | None = "observation.state",
                    dataset_name: str | None = None, skip_bad: bool = False, overwrite: bool = False,
                    size_limit: int | str | None = DEFAULT_SIZE_LIMIT, compression: str | None = None,
                    progress: bool = True, video_tolerance_s: float | None = None,
                    callback: ProgressCallback | None = None, codec: ImageCodec | None = None,
                    cameras: dict[str, str] | None = None) -> dict[str, Any]:
    """Convert a local LeRobotDataset folder (v2.x or v3.0) to robot shards in OUT; returns the summary.

    camera: the primary image feature (default: the first image/video feature in
    meta/info.json); wrist_camera: an optional second one; cameras: more, {name: feature}
    (e.g. {"left_wrist": "observation.images.cam_left_wrist"}, ALOHA's); state_key: the
    proprioception feature (None or "" for none; silently absent when the
    dataset has no such feature). Instructions are the task strings, per step.
    video_tolerance_s: how far the nearest video frame may be from a step's
    timestamp (default a quarter of a frame period).
    """
    root = Path(src)
    if not root.is_dir():
        raise DataError(f"LeRobot dataset folder {root} does not exist or is not a folder")
    check_output(out, overwrite)  # fail before reading anything
    info = _read_json(root / "meta" / "info.json")
    features = info.get("features") or {}
    image_keys = [k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") in ("image", "video")]
    if not image_keys:
        raise DataError(f"{root / 'meta/info.json'}: no feature with dtype 'image' or 'video'; a robot shard needs "
                        f"a camera")
    camera = camera or image_keys[0]
    named = {"primary": camera, **({"wrist": wrist_camera} if wrist_camera else {})}
    for cam_name, key in (cameras or {}).items():
        if not cam_name.isidentifier() or cam_name in named:
            raise DataError(f"camera name {cam_name!r}: use an identifier other than 'primary' and 'wrist' (those "
                            f"are --camera and --wrist-camera)")
        named[cam_name] = key
    for key in named.values():
        if key not in image_keys:
            raise DataError(f"{root}: camera {key!r} is not an image or video feature; available: {image_keys}")
    cameras = list(dict.fromkeys(named.values()))  # feature keys, each decoded once
    if action_key not in features:
        raise DataError(f"{root}: no {action_key!r} feature; available: {list(features)}")
    state_key = state_key if state_key and state_key in features else None
    ds = _load_dataset(root, info, [k for k in cameras if features[k]["dtype"] == "video"])
    name = dataset_name_for(root, dataset_name)
    tolerance = video_tolerance_s if video_tolerance_s is not None else 0.25 / ds.fps
    codec = codec or DEFAULT_CODEC
    video = {k: _VideoCursor(tolerance, codec) for k in cameras}  # one per camera, so each decodes forward through its file
    meta = {"kind": "lerobot", "source": str(root.resolve()), "codebase_version": info.get("codebase_version"),
            "dataset": name, "camera": camera, "wrist_camera": wrist_camera, "state_key": state_key,
            "cameras": {k: v for k, v in named.items() if k not in ("primary", "wrist")}}
    try:
        with ShardWriter(out, overwrite=overwrite, size_limit=size_limit, compression=compression,
                         metadata=meta, codec=codec, cameras=list(named)) as writer:
            write_robot_episodes(writer, _pending_episodes(ds, action_key=action_key, state_key=state_key,
                                                           cameras=named, video=video),
                                 dataset=name, skip_bad=skip_bad, total=len(ds.episodes), progress=progress,
                                 callback=callback)
    finally:
        for cursor in video.values():
            cursor.close()
    return writer.summary
