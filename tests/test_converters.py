"""Converters on small fixtures built here: LeRobot v2.1 (images in parquet, mp4 videos), LeRobot v3, HDF5, LLaVA.

Every fixture is read back with a plain StreamingDataset. Bad rows (NaN actions,
missing images, mismatched lengths) must raise a DataError naming the file,
episode and step, or with skip_bad be counted in the summary.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streaming_helpers import read_plain  # noqa: F401  (fixture)
from vla_scale.cli import main
from vla_scale.data.converters import CONVERTERS, convert_hdf5, convert_lerobot, convert_llava
from vla_scale.data.converters import llava as llava_module
from vla_scale.data.converters.hdf5 import instruction_from_filename
from vla_scale.data.converters.llava import iter_json_records
from vla_scale.data.camera_images import decode_camera_image
from vla_scale.data.schema import optional_array
from vla_scale.errors import DataError

FPS = 10
SIZE = 32
TASKS = ["pick up the red block", "open the top drawer"]
TOP, WRIST = "observation.images.top", "observation.images.wrist"


def _colour(e: int, t: int, wrist: bool = False) -> np.ndarray:
    v = (20 + 23 * t + 71 * e) % 200 + 25
    rgb = [v, 255 - v, (3 * v) % 200 + 20]
    return np.array(rgb[::-1] if wrist else rgb, np.uint8)


def _frame(e: int, t: int, wrist: bool = False) -> np.ndarray:
    return np.broadcast_to(_colour(e, t, wrist), (SIZE, SIZE, 3)).copy()


def _action(e: int, t: int) -> list[float]:
    return [float(e), float(t), 0.1 * t, -0.5, 0.25 * e, 0.0, float(t % 2)]


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _write_mp4(path: Path, frames: list[np.ndarray]) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------
# LeRobot fixtures
# ---------------------------------------------------------------------------------------------
def _features(video: bool) -> dict:
    img = {"dtype": "video" if video else "image", "shape": [SIZE, SIZE, 3], "names": ["height", "width", "channel"]}
    return {"action": {"dtype": "float32", "shape": [7], "names": None},
            "observation.state": {"dtype": "float32", "shape": [3], "names": None},
            TOP: img, WRIST: img,
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None}}


def _episode_table(e: int, length: int, start: int, *, images: bool, fixed: bool, bad: dict):
    import pyarrow as pa

    actions = [_action(e, t) for t in range(length)]
    if bad.get("nan") and bad["nan"][0] == e:
        actions[bad["nan"][1]][2] = float("nan")
    ragged = bad.get("ragged") and bad["ragged"][0] == e
    if ragged:
        actions[bad["ragged"][1]] = actions[bad["ragged"][1]][:5]
    list_type = pa.list_(pa.float32(), 7) if fixed and not ragged else pa.list_(pa.float32())
    cols = {
        "action": pa.array(actions, type=list_type),
        "observation.state": pa.array([[e, t, 1.0] for t in range(length)], type=pa.list_(pa.float32())),
        "timestamp": pa.array([t / FPS for t in range(length)], type=pa.float32()),
        "frame_index": pa.array(range(length), type=pa.int64()),
        "episode_index": pa.array([e] * length, type=pa.int64()),
        "index": pa.array(range(start, start + length), type=pa.int64()),
        "task_index": pa.array([e % 2] * length, type=pa.int64()),
    }
    if images:
        struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        for key, wrist in ((TOP, False), (WRIST, True)):
            values = [{"bytes": _png(_frame(e, t, wrist)), "path": f"frame_{t:06d}.png"} for t in range(length)]
            if not wrist and bad.get("missing_image") and bad["missing_image"][0] == e:
                values[bad["missing_image"][1]] = {"bytes": None, "path": None}
            cols[key] = pa.array(values, type=struct)
    return pa.table(cols)


def make_lerobot_v21(root: Path, lengths=(5, 4, 6), *, video=False, **bad) -> Path:
    import pyarrow.parquet as pq

    (root / "meta").mkdir(parents=True)
    info = {"codebase_version": "v2.1", "robot_type": "toy", "fps": FPS, "chunks_size": 1000,
            "total_episodes": len(lengths), "total_frames": sum(lengths), "total_tasks": len(TASKS),
            "splits": {"train": f"0:{len(lengths)}"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4" if video else None,
            "features": _features(video)}
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                   for i, t in enumerate(TASKS)))
    episodes, start = [], 0
    for e, n in enumerate(lengths):
        listed = n + 1 if bad.get("meta_length") == e else n
        episodes.append(json.dumps({"episode_index": e, "tasks": [TASKS[e % 2]], "length": listed}) + "\n")
        path = root / f"data/chunk-000/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_episode_table(e, n, start, images=not video, fixed=True, bad=bad), path)
        if video:
            frames = n - 2 if bad.get("short_video") == e else n
            for key, wrist in ((TOP, False), (WRIST, True)):
                _write_mp4(root / f"videos/chunk-000/{key}/episode_{e:06d}.mp4",
                           [_frame(e, t, wrist) for t in range(frames)])
        start += n
    (root / "meta/episodes.jsonl").write_text("".join(episodes))
    return root


def make_lerobot_v3(root: Path, lengths=(5, 4, 6), *, files=((0, 1), (2,)), task_column="task", **bad) -> Path:
    """Episodes split over two data files, all frames of a camera in one mp4 (v3 packs episodes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "meta").mkdir(parents=True)
    info = {"codebase_version": "v3.0", "robot_type": "toy", "fps": FPS, "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "total_episodes": len(lengths), "total_frames": sum(lengths), "total_tasks": len(TASKS),
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": _features(video=True)}
    (root / "meta/info.json").write_text(json.dumps(info))
    pq.write_table(pa.table({"task_index": pa.array(range(len(TASKS)), pa.int64()), task_column: TASKS}),
                   root / "meta/tasks.parquet")
    starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    file_of = {e: f for f, eps in enumerate(files) for e in eps}
    for f, eps in enumerate(files):
        path = root / f"data/chunk-000/file-{f:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables([_episode_table(e, lengths[e], starts[e], images=False, fixed=False, bad=bad)
                                         for e in eps]), path, row_group_size=4)
    for key, wrist in ((TOP, False), (WRIST, True)):
        _write_mp4(root / f"videos/{key}/chunk-000/file-000.mp4",
                   [_frame(e, t, wrist) for e, n in enumerate(lengths) for t in range(n)])
    meta = {"episode_index": list(range(len(lengths))), "tasks": [[TASKS[e % 2]] for e in range(len(lengths))],
            "length": list(lengths), "data/chunk_index": [0] * len(lengths),
            "data/file_index": [file_of[e] for e in range(len(lengths))],
            "dataset_from_index": starts[:-1], "dataset_to_index": starts[1:],
            "stats/action/mean": [[0.0] * 7] * len(lengths),
            "meta/episodes/chunk_index": [0] * len(lengths), "meta/episodes/file_index": [0] * len(lengths)}
    for key in (TOP, WRIST):
        meta.update({f"videos/{key}/chunk_index": [0] * len(lengths), f"videos/{key}/file_index": [0] * len(lengths),
                     f"videos/{key}/from_timestamp": [s / FPS for s in starts[:-1]],
                     f"videos/{key}/to_timestamp": [s / FPS for s in starts[1:]]})
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.table(meta), root / "meta/episodes/chunk-000/file-000.parquet")
    return root


def _check_robot_samples(samples, lengths, *, tol, wrist=True, skip=()):
    expected = [(e, t) for e, n in enumerate(lengths) if e not in skip for t in range(n)]
    assert [(int(s["episode"]), int(s["step"])) for s in samples] == expected
    for s, (e, t) in zip(samples, expected):
        assert s["task"] == "robot" and s["instruction"] == TASKS[e % 2]
        np.testing.assert_array_equal(s["action"], np.array(_action(e, t), np.float32))
        np.testing.assert_array_equal(s["state"], np.array([e, t, 1.0], np.float32))
        image = np.asarray(decode_camera_image(s["image"])).astype(int)
        assert np.abs(image - _colour(e, t)).mean() < tol, (e, t, image.mean(axis=(0, 1)), _colour(e, t))
        if wrist:
            w = np.asarray(Image.open(io.BytesIO(s["wrist_image"])).convert("RGB")).astype(int)
            assert np.abs(w - _colour(e, t, wrist=True)).mean() < tol
        else:
            assert s["wrist_image"] == b""


# ---------------------------------------------------------------------------------------------
# LeRobot
# ---------------------------------------------------------------------------------------------
def test_lerobot_v21_images_in_parquet(tmp_path, read_plain):
    src = make_lerobot_v21(tmp_path / "ds")
    summary = convert_lerobot(src, tmp_path / "out", wrist_camera=WRIST, progress=False)
    assert summary["samples"] == 15 and summary["episodes"] == 3 and summary["skipped"]["episodes"] == 0
    assert summary["dataset"] == "ds" and summary["camera"] == TOP
    _check_robot_samples(read_plain(tmp_path / "out"), (5, 4, 6), tol=4)


def test_lerobot_v21_mp4_videos(tmp_path, read_plain):
    src = make_lerobot_v21(tmp_path / "ds", video=True)
    summary = convert_lerobot(src, tmp_path / "out", wrist_camera=WRIST, dataset_name="toy", progress=False)
    assert summary["samples"] == 15
    samples = read_plain(tmp_path / "out")
    assert {s["dataset"] for s in samples} == {"toy"}
    _check_robot_samples(samples, (5, 4, 6), tol=8)


@pytest.mark.parametrize("task_column", ["task", "__index_level_0__"])
def test_lerobot_v3_packed_files_and_videos(tmp_path, read_plain, task_column):
    src = make_lerobot_v3(tmp_path / "ds", task_column=task_column)
    summary = convert_lerobot(src, tmp_path / "out", wrist_camera=WRIST, progress=False)
    assert summary["samples"] == 15 and summary["episodes"] == 3 and summary["codebase_version"] == "v3.0"
    _check_robot_samples(read_plain(tmp_path / "out"), (5, 4, 6), tol=8)


def test_lerobot_without_state_or_wrist(tmp_path, read_plain):
    src = make_lerobot_v21(tmp_path / "ds", lengths=(3,))
    convert_lerobot(src, tmp_path / "out", state_key=None, progress=False)
    (sample,) = read_plain(tmp_path / "out")[:1]
    assert optional_array(sample["state"]) is None and sample["wrist_image"] == b""


@pytest.mark.parametrize("layout", ["v2.1", "v3"])
def test_lerobot_nan_action_names_file_episode_and_step(tmp_path, read_plain, layout):
    if layout == "v2.1":
        src, where = make_lerobot_v21(tmp_path / "ds", nan=(1, 2)), r"episode_000001\.parquet: episode 1, step 2"
    else:
        src, where = make_lerobot_v3(tmp_path / "ds", nan=(1, 2)), r"file-000\.parquet: episode 1, step 2"
    with pytest.raises(DataError, match=where + r": action\[2\] is nan"):
        convert_lerobot(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    summary = convert_lerobot(src, tmp_path / "out", skip_bad=True, progress=False)
    assert summary["samples"] == 11 and summary["episodes"] == 2
    assert summary["skipped"]["episodes"] == 1 and summary["skipped"]["samples"] == 4
    assert summary["skipped"]["reasons"] == {"non-finite action": 1}
    _check_robot_samples(read_plain(tmp_path / "out"), (5, 4, 6), tol=8, wrist=False, skip=(1,))


@pytest.mark.parametrize("bad,message,reason", [
    ({"missing_image": (2, 3)}, r"episode_000002\.parquet: episode 2, step 3: the image is missing", "missing image"),
    ({"meta_length": 0}, r"episode_000000\.parquet: episode 0: meta lists 6 steps, the data file has 5 rows",
     "length mismatch"),
    ({"ragged": (1, 3)}, r"episode_000001\.parquet: episode 1, step 3: action has 5 values, step 0 has 7",
     "length mismatch"),
])
def test_lerobot_bad_rows(tmp_path, bad, message, reason):
    src = make_lerobot_v21(tmp_path / "ds", **bad)
    with pytest.raises(DataError, match=message):
        convert_lerobot(src, tmp_path / "out", progress=False)
    summary = convert_lerobot(src, tmp_path / "out", skip_bad=True, progress=False)
    assert summary["skipped"]["reasons"] == {reason: 1} and summary["skipped"]["episodes"] == 1
    assert summary["episodes"] == 2


def test_lerobot_video_shorter_than_episode(tmp_path):
    src = make_lerobot_v21(tmp_path / "ds", video=True, short_video=2)
    with pytest.raises(DataError, match=r"episode_000002\.parquet: episode 2 \(observation.images.top\), step 4: "
                                        r"episode_000002\.mp4 has no frame within"):
        convert_lerobot(src, tmp_path / "out", progress=False)
    summary = convert_lerobot(src, tmp_path / "out", skip_bad=True, progress=False)
    assert summary["samples"] == 9 and summary["skipped"]["reasons"] == {"missing image": 1}


def test_lerobot_unknown_camera_and_version(tmp_path):
    src = make_lerobot_v21(tmp_path / "ds", lengths=(2,))
    with pytest.raises(DataError, match="camera 'observation.images.side' is not an image or video feature"):
        convert_lerobot(src, tmp_path / "out", camera="observation.images.side", progress=False)
    info = json.loads((src / "meta/info.json").read_text())
    (src / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(DataError, match="v1.6.*not supported"):
        convert_lerobot(src, tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------
# atomicity and overwrite (through a converter)
# ---------------------------------------------------------------------------------------------
def test_interrupted_or_failed_conversion_leaves_no_output(tmp_path):
    src = make_lerobot_v21(tmp_path / "ds", nan=(2, 1))  # fails at the last episode, after two were written

    def ctrl_c(summary):
        if summary["episodes"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_lerobot(src, tmp_path / "out", progress=False, callback=ctrl_c)
    with pytest.raises(DataError, match="episode 2, step 1"):
        convert_lerobot(src, tmp_path / "out", progress=False, size_limit=2000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no OUT, no OUT.tmp-*


def test_rerun_refuses_to_overwrite_unless_asked(tmp_path, read_plain):
    src = make_lerobot_v21(tmp_path / "ds", lengths=(2, 3))
    convert_lerobot(src, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        convert_lerobot(src, tmp_path / "out", progress=False)
    summary = convert_lerobot(src, tmp_path / "out", overwrite=True, dataset_name="again", progress=False)
    assert summary["samples"] == 5
    assert {s["dataset"] for s in read_plain(tmp_path / "out")} == {"again"}


# ---------------------------------------------------------------------------------------------
# HDF5 (robomimic / LIBERO)
# ---------------------------------------------------------------------------------------------
def _marked(t: int, demo: int) -> np.ndarray:
    img = np.zeros((16, 16, 3), np.uint8)
    img[:4, :4] = 250  # a bright top-left corner, to see the 180-degree flip
    img[8:, 8:] = (10 * t + 40 * demo) % 200
    return img


def make_libero(path: Path, *, demos=3, steps=6, nan=None, short=None, problem_info=True) -> Path:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        if problem_info:
            data.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation",
                                                     "language_instruction": "put the bowl on the plate"})
        for d in range(demos):
            g = data.create_group(f"demo_{d}")
            actions = np.array([[d, t, 0.1, 0.2, 0.3, 0.0, -1.0 + 2 * (t % 2)] for t in range(steps)], np.float64)
            if nan is not None and nan[0] == d:
                actions[nan[1], 4] = np.inf
            g.create_dataset("actions", data=actions)
            obs = g.create_group("obs")
            frames = steps - 1 if short == d else steps
            obs.create_dataset("agentview_rgb", data=np.stack([_marked(t, d) for t in range(frames)]))
            obs.create_dataset("eye_in_hand_rgb", data=np.stack([_marked(t, d)[::-1] for t in range(steps)]))
            obs.create_dataset("ee_states", data=np.full((steps, 6), d, np.float64))
            obs.create_dataset("gripper_states", data=np.full((steps, 2), 0.5))
            obs.create_dataset("joint_states", data=np.zeros((steps, 7)))
    return path


def test_hdf5_libero_layout(tmp_path, read_plain):
    src = make_libero(tmp_path / "libero" / "KITCHEN_SCENE1_put_the_bowl_on_the_plate_demo.hdf5")
    summary = convert_hdf5(src, tmp_path / "out", wrist_camera="eye_in_hand_rgb", flip_images=True, progress=False)
    assert summary["samples"] == 18 and summary["episodes"] == 3
    samples = read_plain(tmp_path / "out")
    for i, s in enumerate(samples):
        d, t = divmod(i, 6)
        assert (int(s["episode"]), int(s["step"])) == (d, t)
        assert s["instruction"] == "put the bowl on the plate"
        np.testing.assert_array_equal(s["action"], np.array([d, t, 0.1, 0.2, 0.3, 0.0, -1.0 + 2 * (t % 2)], np.float32))
        np.testing.assert_array_equal(s["state"], np.array([d] * 6 + [0.5, 0.5], np.float32))
        img = np.asarray(decode_camera_image(s["image"])).astype(int)
        assert img[-2:, -2:].mean() > 200 and img[10:14, 2:6].mean() < 10  # rotated 180: bright corner bottom-right
        assert abs(img[2:6, 2:6].mean() - (10 * t + 40 * d) % 200) < 6
        assert s["wrist_image"][:2] == b"\xff\xd8"


def test_hdf5_folder_instruction_from_file_name_and_bad_demos(tmp_path, read_plain):
    make_libero(tmp_path / "suite" / "LIVING_ROOM_SCENE2_pick_up_the_ketchup_demo.hdf5", problem_info=False,
                nan=(1, 3))
    make_libero(tmp_path / "suite" / "STUDY_SCENE1_close_the_box_demo.hdf5", problem_info=False, short=2)
    with pytest.raises(DataError, match=r"pick_up_the_ketchup_demo\.hdf5: demo_0: no language instruction.*"
                                        r"--instruction-from-filename"):
        convert_hdf5(tmp_path / "suite", tmp_path / "out", progress=False, skip_bad=True)  # never the name silently
    with pytest.raises(DataError, match=r"pick_up_the_ketchup_demo\.hdf5: demo_1, step 3: action\[4\] is inf"):
        convert_hdf5(tmp_path / "suite", tmp_path / "out", progress=False, instruction_from_filename=True)
    summary = convert_hdf5(tmp_path / "suite", tmp_path / "out", skip_bad=True, progress=False,
                           dataset_name="libero_toy", instruction_from_filename=True)
    assert summary["samples"] == 24 and summary["episodes"] == 4
    assert summary["skipped"]["reasons"] == {"non-finite action": 1, "length mismatch": 1}
    assert any("close_the_box_demo.hdf5: demo_2, step 5: obs/agentview_rgb has 5 frames for 6 actions" in m
               for m in summary["skipped"]["examples"])
    samples = read_plain(tmp_path / "out")
    assert [s["instruction"] for s in samples[::6]] == ["pick up the ketchup"] * 2 + ["close the box"] * 2
    assert sorted({int(s["episode"]) for s in samples}) == [0, 2, 3, 4]  # ids run across files; 1 and 5 skipped
    assert samples[0]["dataset"] == "libero_toy"


def test_instruction_from_libero_file_names():
    assert instruction_from_filename("KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5") == "turn on the stove"
    assert instruction_from_filename("pick_up_the_black_bowl_between_the_plate_demo.hdf5") == \
        "pick up the black bowl between the plate"


# ---------------------------------------------------------------------------------------------
# LLaVA
# ---------------------------------------------------------------------------------------------
RECORDS = [
    {"id": "a", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the mug?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Where is it, left or right?"}, {"from": "gpt", "value": "On the left."}]},
    {"id": "b", "image": "sub/img1.jpg", "conversations": [
        {"from": "human", "value": "Point to free space between the plates.\n<image>"},
        {"from": "gpt", "value": "[(0.56, 0.69), (0.12, 0.30)]"}]},
    {"id": 3, "image": "img2.png", "conversations": [
        {"from": "system", "value": "You are helpful."},
        {"from": "human", "value": "<image>\nPlease provide the bounding box of: the cup, \"left\" ]"},
        {"from": "gpt", "value": "[0.1, 0.2, 0.3, 0.4]"}]},
]
BAD_RECORDS = [
    {"id": "no-image", "conversations": RECORDS[0]["conversations"]},
    {"id": "missing-file", "image": "nope.png", "conversations": RECORDS[0]["conversations"]},
    {"id": "unpaired", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nHello?"}]},
]


def make_llava(root: Path, records, *, jsonl=False) -> Path:
    (root / "images" / "sub").mkdir(parents=True)
    y, x = np.mgrid[0:20, 0:24]
    for k, name in enumerate(("img0.png", "sub/img1.jpg", "img2.png")):  # smooth, so JPEG error stays small
        img = np.stack([x * 10, y * 12, np.full_like(x, 60 * k)], axis=-1).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / name, quality=95)
    path = root / ("data.jsonl" if jsonl else "data.json")
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records, indent=1))
    return path


@pytest.mark.parametrize("jsonl", [False, True])
def test_llava_to_vl_shards(tmp_path, read_plain, jsonl):
    src = make_llava(tmp_path, RECORDS, jsonl=jsonl)
    summary = convert_llava(src, tmp_path / "out", images=tmp_path / "images", task="affordance", progress=False)
    assert summary["samples"] == 3 and summary["episodes"] == 0
    samples = read_plain(tmp_path / "out")
    assert [s["turns"] for s in samples] == [
        [{"question": "What colour is the mug?", "answer": "Red."},
         {"question": "Where is it, left or right?", "answer": "On the left."}],
        [{"question": "Point to free space between the plates.", "answer": "[(0.56, 0.69), (0.12, 0.30)]"}],
        [{"question": "Please provide the bounding box of: the cup, \"left\" ]", "answer": "[0.1, 0.2, 0.3, 0.4]"}],
    ]
    assert {s["task"] for s in samples} == {"affordance"} and {int(s["episode"]) for s in samples} == {-1}
    source = np.asarray(Image.open(tmp_path / "images" / "img0.png").convert("RGB")).astype(int)
    assert np.abs(np.asarray(decode_camera_image(samples[0]["image"])).astype(int) - source).mean() < 4


def test_llava_bad_samples(tmp_path, read_plain):
    src = make_llava(tmp_path, RECORDS[:1] + BAD_RECORDS + RECORDS[1:])
    with pytest.raises(DataError, match=r"data\.json: record 2 \(id missing-file\): image file .*nope\.png"):
        convert_llava(src, tmp_path / "out", images=tmp_path / "images", task="vqa", progress=False)
    summary = convert_llava(src, tmp_path / "out", images=tmp_path / "images", task="vqa", skip_bad=True,
                            progress=False)
    assert summary["samples"] == 4 and summary["skipped"]["samples"] == 2  # the text-only record is a sample
    assert summary["skipped"]["reasons"] == {"missing image": 1, "bad conversation": 1}
    assert any("record 2 (id missing-file): image file" in m for m in summary["skipped"]["examples"])
    assert len(read_plain(tmp_path / "out")) == 4


def test_json_array_is_read_incrementally(tmp_path, monkeypatch):
    monkeypatch.setattr(llava_module, "_READ_CHARS", 7)  # force many refills mid-token, mid-string
    records = RECORDS + [{"id": "ü", "image": "x]y,.png", "n": 12345678901234, "v": [1, [2, {"a": "]"}]]}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    assert list(iter_json_records(path)) == records
    path.write_text("  [ ]  ")
    assert list(iter_json_records(path)) == []
    path.write_text('[{"a": 1}, {"b": ')
    with pytest.raises(DataError, match="invalid JSON|not closed"):
        list(iter_json_records(path))
    path.write_text('[{"a": 1} {"b": 2}]')
    with pytest.raises(DataError, match="expected ',' or ']'"):
        list(iter_json_records(path))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_convert_and_stats(tmp_path, capsys, read_plain):
    from vla_scale.actions import ActionNormalizer
    from vla_scale.data.stats import load_stats

    assert set(CONVERTERS) == {"lerobot", "hdf5", "llava", "rlds"}
    src = make_lerobot_v21(tmp_path / "ds")
    out = tmp_path / "shards"
    assert main(["convert", "lerobot", str(src), str(out), "--wrist-camera", WRIST, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 15
    assert main(["convert", "lerobot", str(src), str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", "lerobot", str(src), str(out), "--overwrite", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["stats", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)[str(out / "stats.json")]["count"] == 15
    stats = load_stats(out)
    assert ActionNormalizer.from_stats(stats).dim == 7 and stats["mask"] == [True] * 6 + [False]

    libero = make_libero(tmp_path / "h5" / "put_the_bowl_on_the_plate_demo.hdf5", demos=1, steps=3, nan=(0, 1))
    assert main(["convert", "hdf5", str(libero), str(tmp_path / "h"), "--flip-images", "--no-progress"]) == 2
    assert "demo_0, step 1" in capsys.readouterr().err
    assert main(["convert", "hdf5", str(libero), str(tmp_path / "h"), "--images", "x", "--no-progress"]) == 2
    assert "--images applies to llava only" in capsys.readouterr().err

    llava = make_llava(tmp_path / "vl", RECORDS + BAD_RECORDS)
    assert main(["convert", "llava", str(llava), str(tmp_path / "v"), "--images", str(tmp_path / "vl" / "images"),
                 "--task", "spatial", "--skip-bad", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 4 and summary["skipped"]["samples"] == 2
    assert main(["convert", "llava", str(llava), str(tmp_path / "w"), "--no-progress"]) == 2
    assert "needs --task" in capsys.readouterr().err


def test_convert_llava_reports_records_over_max_tokens(tmp_path, tiny_llava, capsys):
    from vla_scale.cli import main
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.models.loading import load_tokenizer

    src = make_llava(tmp_path, RECORDS)
    prompts = PromptBuilder(load_tokenizer(tiny_llava), None, 10_000)
    turns = [conv for conv in [
        [{"question": "What colour is the mug?", "answer": "Red."},
         {"question": "Where is it, left or right?", "answer": "On the left."}],
        [{"question": "Point to free space between the plates.", "answer": "[(0.56, 0.69), (0.12, 0.30)]"}],
        [{"question": "Please provide the bounding box of: the cup, \"left\" ]", "answer": "[0.1, 0.2, 0.3, 0.4]"}]]]
    lengths = sorted(len(prompts.build_vl_turns(t).input_ids) for t in turns)
    limit = lengths[1]  # exactly one record is longer
    rc = main(["convert", "llava", str(src), str(tmp_path / "out"), "--images", str(tmp_path / "images"),
               "--task", "vqa", "--no-progress", "--max-tokens", str(limit), "--tokenizer", str(tiny_llava)])
    report = json.loads(capsys.readouterr().out)["max_tokens"]
    assert rc == 0 and report["over"] == 1 and report["longest"] == lengths[-1] and report["limit"] == limit
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["max_tokens"]["over"] == 1
    assert main(["convert", "llava", str(src), str(tmp_path / "out2"), "--task", "vqa", "--max-tokens", "5"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# issue 14: the converters' gaps (instructions, filter keys, LIBERO's orientation, cameras, corrupt data,
# text-only and multi-image LLaVA records)
# ---------------------------------------------------------------------------------------------
def _robomimic(path: Path, *, env_args=None, mask=None, demos=3, steps=4, corrupt=None) -> Path:
    """A robomimic-layout file (no problem_info): chunked, compressed frames, one chunk per step."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        if env_args is not None:
            data.attrs["env_args"] = json.dumps(env_args)
        for d in range(demos):
            g = data.create_group(f"demo_{d}")
            g.create_dataset("actions", data=np.full((steps, 7), d, np.float64))
            obs = g.create_group("obs")
            obs.create_dataset("agentview_image", data=np.stack([_marked(t, d) for t in range(steps)]),
                               chunks=(1, 16, 16, 3), compression="gzip")
            obs.create_dataset("robot0_eye_in_hand_image", data=np.stack([_marked(t, d)[:, ::-1] for t in range(steps)]))
            obs.create_dataset("sideview_image", data=np.stack([255 - _marked(t, d) for t in range(steps)]))
        if mask is not None:
            m = f.create_group("mask")
            for key, names in mask.items():
                m.create_dataset(key, data=np.array([n.encode() for n in names]))
    if corrupt is not None:  # overwrite one stored chunk (demo, step) of agentview_image with garbage
        with h5py.File(path, "r") as f:
            info = f[f"data/demo_{corrupt[0]}/obs/agentview_image"].id.get_chunk_info(corrupt[1])
        with open(path, "r+b") as fh:
            fh.seek(info.byte_offset)
            fh.write(b"\xff" * info.size)
    return path


def test_robomimic_instruction_never_comes_from_the_file_name(tmp_path, read_plain):
    src = _robomimic(tmp_path / "image_v141.hdf5")
    with pytest.raises(DataError, match=r"image_v141\.hdf5: demo_0: no language instruction.*--instruction TEXT"):
        convert_hdf5(src, tmp_path / "out", progress=False)
    summary = convert_hdf5(src, tmp_path / "out", instruction="lift the cube", progress=False)
    assert {s["instruction"] for s in read_plain(tmp_path / "out")} == {"lift the cube"}
    assert summary["samples"] == 12
    src2 = _robomimic(tmp_path / "b" / "image_v141.hdf5",
                      env_args={"env_name": "Lift", "env_kwargs": {"lang": "pick up the red cube"}})
    convert_hdf5(src2, tmp_path / "out2", progress=False)
    assert {s["instruction"] for s in read_plain(tmp_path / "out2")} == {"pick up the red cube"}


def test_filter_key_converts_only_the_masked_demos(tmp_path, read_plain):
    src = _robomimic(tmp_path / "lift.hdf5", mask={"train": ["demo_0", "demo_2"], "valid": ["demo_1"]})
    convert_hdf5(src, tmp_path / "train", instruction="lift", filter_key="train", progress=False)
    convert_hdf5(src, tmp_path / "valid", instruction="lift", filter_key="valid", progress=False)
    assert [float(s["action"][0]) for s in read_plain(tmp_path / "train")] == [0.0] * 4 + [2.0] * 4
    assert [float(s["action"][0]) for s in read_plain(tmp_path / "valid")] == [1.0] * 4
    with pytest.raises(DataError, match=r"--filter-key 'test' is not in the file's mask/ group .*\['train', 'valid'\]"):
        convert_hdf5(src, tmp_path / "x", instruction="lift", filter_key="test", progress=False)


def test_libero_is_flipped_when_the_file_says_opengl_and_both_cameras_come_along(tmp_path, read_plain):
    import h5py

    src = make_libero(tmp_path / "a" / "put_the_bowl_on_the_plate_demo.hdf5", demos=1, steps=2)
    plain = convert_hdf5(src, tmp_path / "plain", progress=False)
    with h5py.File(src, "r+") as f:
        f["data"].attrs["macros_image_convention"] = "opengl"  # what LIBERO's own files say
    flipped = convert_hdf5(src, tmp_path / "flipped", progress=False)
    forced = convert_hdf5(src, tmp_path / "forced", flip_images=False, progress=False)
    assert plain["samples"] == flipped["samples"] == forced["samples"] == 2

    def corner(folder):  # where the bright 4x4 marker sits: "top-left" upright, "bottom-right" rotated
        img = np.asarray(decode_camera_image(read_plain(folder)[0]["image"])).astype(int)
        return "top-left" if img[:2, :2].mean() > 200 else "bottom-right" if img[-2:, -2:].mean() > 200 else "?"

    assert (corner(tmp_path / "plain"), corner(tmp_path / "flipped"), corner(tmp_path / "forced")) == \
        ("top-left", "bottom-right", "top-left")
    # LIBERO's second camera (eye_in_hand_rgb) is the wrist camera by default, flipped with the first.
    s = read_plain(tmp_path / "flipped")[1]
    wrist = np.asarray(Image.open(io.BytesIO(s["wrist_image"])).convert("RGB")).astype(int)
    assert np.abs(wrist - _marked(1, 0)[::-1][::-1, ::-1]).mean() < 6


def test_named_cameras_are_read_from_hdf5_obs_and_lerobot_features(tmp_path):
    """The reading side of named cameras: each converter hands the writer every camera, by name."""
    from vla_scale.data.converters.common import decode_image
    from vla_scale.data.converters.hdf5 import _pending
    from vla_scale.data.converters.lerobot import _load_dataset, _pending_episodes, _VideoCursor

    src = _robomimic(tmp_path / "lift.hdf5", demos=1, steps=2)
    gen = _pending([src], camera=None, wrist_camera=None, state_keys=(), flip_images=None, instruction="lift",
                   cameras={"side": "sideview_image"})  # the file stays open while the generator lives
    ep = next(gen).load()
    assert set(ep.cameras) == {"side"} and ep.wrist_images is not None
    side = np.asarray(decode_image(ep.cameras["side"][1], "x")).astype(int)
    assert np.abs(side - (255 - _marked(1, 0))).mean() < 6
    wrist = np.asarray(decode_image(ep.wrist_images[1], "x")).astype(int)
    assert np.abs(wrist - _marked(1, 0)[:, ::-1]).mean() < 6

    root = make_lerobot_v21(tmp_path / "ds", lengths=(2,))
    info = json.loads((root / "meta/info.json").read_text())
    ds = _load_dataset(root, info, [])
    pending = _pending_episodes(ds, action_key="action", state_key=None, video={TOP: _VideoCursor(0.01)},
                                cameras={"primary": TOP, "left_wrist": WRIST})
    ep = next(pending).load()
    gen.close()
    assert set(ep.cameras) == {"left_wrist"} and ep.wrist_images is None
    got = np.asarray(decode_image(ep.cameras["left_wrist"][1], "x")).astype(int)
    assert np.abs(got - _colour(0, 1, wrist=True)).max() == 0
    with pytest.raises(DataError, match="camera name 'primary'"):
        convert_lerobot(root, tmp_path / "o", cameras={"primary": WRIST}, progress=False)


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_corrupt_hdf5_chunk_names_file_demo_and_step(tmp_path, skip_bad):
    src = _robomimic(tmp_path / "lift.hdf5", corrupt=(1, 2))
    with pytest.raises(DataError, match=r"lift\.hdf5: demo_1, step 2: cannot read obs/agentview_image"):
        convert_hdf5(src, tmp_path / "out", instruction="lift", skip_bad=skip_bad, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_corrupt_parquet_page_names_file_episode_and_step(tmp_path, skip_bad):
    import pyarrow.parquet as pq

    root = make_lerobot_v21(tmp_path / "ds")
    path = root / "data/chunk-000/episode_000001.parquet"
    meta = pq.ParquetFile(path).metadata
    col = next(meta.row_group(0).column(i) for i in range(meta.num_columns)
               if meta.row_group(0).column(i).path_in_schema.startswith("action"))
    with open(path, "r+b") as fh:  # garble the action column's page header
        fh.seek(col.data_page_offset)
        fh.write(b"\xff" * 24)
    with pytest.raises(DataError, match=r"episode_000001\.parquet: episode 1, step 0 or later.*cannot read the "
                                        r"parquet data"):
        convert_lerobot(root, tmp_path / "out", skip_bad=skip_bad, progress=False)


def test_llava_text_only_records_are_samples_without_an_image_and_multi_image_ones_are_skipped(tmp_path,
                                                                                               read_plain):
    from vla_scale.data.schema import camera_image

    text_only = {"id": "sharegpt", "conversations": [{"from": "human", "value": "Write a haiku."},
                                                     {"from": "gpt", "value": "Old pond, a frog."}]}
    multi = {"id": "multi", "image": ["img0.png", "img2.png"], "conversations": RECORDS[0]["conversations"]}
    src = make_llava(tmp_path, [RECORDS[0], text_only, multi, RECORDS[1]])
    summary = convert_llava(src, tmp_path / "out", images=tmp_path / "images", task="vqa", progress=False)
    assert summary["samples"] == 3
    assert summary["skipped"]["reasons"] == {"multi-image record": 1} and summary["skipped"]["samples"] == 1
    samples = read_plain(tmp_path / "out")
    assert [camera_image(s, "primary") is None for s in samples] == [False, True, False]
    assert samples[1]["turns"] == [{"question": "Write a haiku.", "answer": "Old pond, a frog."}]


def test_named_cameras_are_written_as_declared_columns(tmp_path, read_plain):
    """The writing side: a converter declares its named cameras, so `image_<name>` columns reach the shards
    (read back as written); an undeclared camera column is refused with the fix, a row without a declared
    camera stores it as absent, and a bad camera name is refused before anything is created."""
    from vla_scale.data.schema import robot_sample, vl_sample
    from vla_scale.data.writer import ShardWriter

    src = _robomimic(tmp_path / "lift.hdf5", demos=2, steps=3)
    summary = convert_hdf5(src, tmp_path / "out", instruction="lift", cameras={"side": "sideview_image"},
                           progress=False)
    rows = read_plain(tmp_path / "out")
    assert summary["samples"] == len(rows) == 6
    for k, row in enumerate(rows):
        side = np.asarray(decode_camera_image(row["image_side"])).astype(int)
        assert np.abs(side - (255 - _marked(k % 3, k // 3))).mean() < 6

    img = np.zeros((8, 8, 3), np.uint8)
    row = robot_sample(image=img, cameras={"left": img + 50}, instruction="go", action=np.zeros(7, np.float32),
                       dataset="d", episode=0, step=0)
    w = ShardWriter(tmp_path / "undeclared")
    with pytest.raises(DataError, match=r"extra \['image_left'\].*ShardWriter\(\.\.\., cameras=\['left'\]\)"):
        w.write(row)
    w.abort()
    with ShardWriter(tmp_path / "declared", cameras=["primary", "wrist", "left"]) as w:
        w.write(row)
        w.write(vl_sample(image=img, turns=[{"question": "q?", "answer": "a"}], task="vqa", dataset="v"))
    robot, vl = read_plain(tmp_path / "declared")
    assert np.asarray(decode_camera_image(robot["image_left"])).min() == 50 and vl["image_left"] == b""
    with pytest.raises(DataError, match="camera name 'left side'"):
        ShardWriter(tmp_path / "bad", cameras=["left side"])
    assert not (tmp_path / "bad").exists()
