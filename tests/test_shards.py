"""The shard schema and the atomic ShardWriter: plain StreamingDataset reads back what we wrote;
camera images at the configured fidelity (source JPEG bytes kept, one encode otherwise); old shards
(streaming's `jpeg` image column) still train."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from streaming_helpers import read_plain  # noqa: F401  (fixture)
from vla_scale.data.camera_images import (DEFAULT_CODEC, ImageCodec, camera_column, camera_of_column,
                                          decode_camera_image)
from vla_scale.data.schema import ABSENT, COLUMNS, optional_array, robot_sample, vl_sample
from vla_scale.data.writer import SUMMARY_FILE, ShardWriter
from vla_scale.errors import DataError


def _image(rng, h=24, w=32):
    # smooth content, so JPEG error is small and PSNR meaningful
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def _jpeg(pixels, quality, subsampling=0):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def _samples(rng):
    robot = [robot_sample(image=_image(rng), wrist_image=_image(rng, 16, 16), instruction="pick up the red block",
                          action=rng.normal(size=7).astype(np.float32), state=rng.normal(size=8), dataset="toy",
                          episode=3, step=t) for t in range(3)]
    robot.append(robot_sample(image=_image(rng), instruction="open the drawer",
                              action=rng.normal(size=(4, 7)).astype(np.float32), dataset="toy", episode=4, step=0))
    vl = [vl_sample(image=_image(rng), task="affordance", dataset="robopoint",
                    turns=[{"question": "Point to the mug.", "answer": "[(0.56, 0.69), (0.12, 0.3)]"},
                           {"question": "Box the cup.", "answer": "[0.1, 0.2, 0.3, 0.4]"}])]
    return robot + vl


def test_writer_round_trips_through_plain_streaming_dataset(tmp_path, read_plain):
    rng = np.random.default_rng(0)
    written = _samples(rng)
    originals = [np.asarray(s["image"]) for s in written]
    wrists = [np.asarray(s["wrist_image"]) if not isinstance(s["wrist_image"], bytes) else None for s in written]
    with ShardWriter(tmp_path / "out") as w:
        for s in written:
            w.write(s)
    back = read_plain(tmp_path / "out")
    assert len(back) == len(written)
    for orig, pixels, wrist, got in zip(written, originals, wrists, back):
        assert set(got) == set(COLUMNS)
        for key in ("task", "dataset", "instruction", "turns"):
            assert got[key] == orig[key]
        assert int(got["episode"]) == orig["episode"] and int(got["step"]) == orig["step"]
        np.testing.assert_array_equal(got["action"], orig["action"])
        assert got["action"].dtype == np.float32
        np.testing.assert_array_equal(got["state"], orig["state"])
        # Every camera: exactly one JPEG at the default quality 95 (4:4:4), not streaming's q75
        for column, original in (("image", pixels), ("wrist_image", wrist)):
            if original is None:
                assert got[column] == b""
                continue
            assert got[column] == _jpeg(original, 95)
            q75 = np.asarray(Image.open(io.BytesIO(_jpeg(original, 75, subsampling=2))))  # what shards held before
            # measured on this noisy content: 39.0 dB against 36.9 dB
            assert _psnr(np.asarray(decode_camera_image(got[column])), original) > _psnr(q75, original) + 1.5
    robot, chunk, vl = back[0], back[3], back[4]
    assert chunk["action"].shape == (4, 7)
    assert optional_array(chunk["state"]) is None and optional_array(robot["state"]).shape == (8,)
    assert optional_array(vl["action"]) is None and vl["episode"] == -1 and vl["turns"][0]["answer"].startswith("[(")
    assert vl["wrist_image"] == b""
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    for shard in index["shards"]:  # hashes for standard tools (sha1) and for fast checks on read (xxh64)
        assert sorted(shard["raw_data"]["hashes"]) == ["sha1", "xxh64"]
        data = (tmp_path / "out" / shard["raw_data"]["basename"]).read_bytes()
        import hashlib

        assert shard["raw_data"]["hashes"]["sha1"] == hashlib.sha1(data).hexdigest()


def test_source_jpeg_is_stored_byte_for_byte_and_other_frames_are_encoded_once(tmp_path, read_plain):
    rng = np.random.default_rng(7)
    pixels = _image(rng)
    source_jpeg = _jpeg(pixels, 80, subsampling=2)  # e.g. a LLaVA/COCO file or a JPEG-in-parquet frame
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    rows = [robot_sample(image=source_jpeg, wrist_image=png.getvalue(), instruction="a", action=[0.0], dataset="d",
                         episode=0, step=0),
            robot_sample(image=png.getvalue(), instruction="b", action=[0.0], dataset="d", episode=0, step=1)]
    for codec, name in ((DEFAULT_CODEC, "jpeg"), (ImageCodec("png"), "png")):
        with ShardWriter(tmp_path / name, codec=codec) as w:
            for r in rows:
                w.write(r)
        assert w.summary["image_codec"] == codec.describe()
        jpeg_row, png_row = read_plain(tmp_path / name)
        assert jpeg_row["image"] == source_jpeg  # never re-encoded, whatever the codec
        if name == "png":  # lossless both ways: PNG kept, pixels exact
            assert jpeg_row["wrist_image"] == png.getvalue() and png_row["image"] == png.getvalue()
            np.testing.assert_array_equal(np.asarray(decode_camera_image(png_row["image"])), pixels)
        else:  # PNG source under the jpeg codec: one encode at quality 95
            assert png_row["image"] == _jpeg(pixels, 95)
    with pytest.raises(DataError, match="quality"):
        ImageCodec("jpeg", 0)
    with pytest.raises(DataError, match="format"):
        ImageCodec("webp")


def test_camera_columns_follow_one_convention():
    assert camera_column("primary") == "image" and camera_column("wrist") == "image_wrist"
    assert [camera_of_column(c) for c in ("image", "image_left_wrist", "wrist_image", "action")] == \
        ["primary", "left_wrist", "wrist", None]
    with pytest.raises(DataError, match="camera name"):
        camera_column("wrist cam")
    assert decode_camera_image(b"") is None
    with pytest.raises(DataError, match="cannot decode"):
        decode_camera_image(b"\xff\xd8\xff\xe0 not a jpeg", "shard x, sample 3")


def test_shards_written_before_image_bytes_still_train(tiny_config, tiny_llava, tmp_path):
    """Shards whose `image` column used streaming's `jpeg` encoding (and had no hashes) still load
    through the training pipeline: the pipeline decodes both layouts."""
    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.data.pipeline import build_data
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.data.streaming_compat import import_streaming
    from vla_scale.models.loading import load_tokenizer

    old_columns = {**COLUMNS, "image": "jpeg"}
    rng = np.random.default_rng(8)
    paths = {}
    for task in ("robot", "vqa"):
        paths[task] = tmp_path / f"old_{task}"
        with import_streaming().MDSWriter(out=str(paths[task]), columns=old_columns) as w:
            for i in range(8):
                row = (robot_sample(image=_image(rng), instruction="pick it", action=[*rng.normal(size=6), i % 2],
                                    dataset="d",
                                    episode=0, step=i) if task == "robot" else
                       vl_sample(image=_image(rng), task="vqa", dataset="v", turns=[{"question": "q?", "answer": "a"}]))
                w.write({**row, "image": Image.fromarray(_image(rng))})
    cfg = tiny_config(f"data.sources=[{{name: robot, task: robot, path: {paths['robot']}, weight: 0.5}}, "
                      f"{{name: vqa, task: vqa, path: {paths['vqa']}, weight: 0.5}}]",
                      "train.global_batch_size=4", "train.micro_batch_size=4")
    tok = load_tokenizer(tiny_llava)
    loader, _ = build_data(cfg, PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length))
    batch = loader.next_step()[0]
    assert batch["pixel_values"].shape[0] == 4 and batch["pixel_values"].float().std() > 0


def test_summary_counts_and_is_saved(tmp_path):
    rng = np.random.default_rng(1)
    with ShardWriter(tmp_path / "out", metadata={"kind": "test"}) as w:
        for s in _samples(rng):
            w.write(s)
        w.skip("missing image", "x: episode 9, step 2: the image is missing", episodes=1, samples=5)
    summary = w.summary
    assert summary["samples"] == 5 and summary["episodes"] == 2  # episodes 3 and 4; VL rows have none
    assert summary["skipped"] == {"samples": 5, "episodes": 1, "reasons": {"missing image": 1},
                                  "examples": ["x: episode 9, step 2: the image is missing"]}
    assert summary["shards"] == 1 and summary["bytes"] > 0 and summary["kind"] == "test"
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["samples"] == 5


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_no_output(tmp_path, error):
    rng = np.random.default_rng(2)
    with pytest.raises(type(error)):
        with ShardWriter(tmp_path / "out", size_limit=2000) as w:
            for s in _samples(rng):
                w.write(s)
            raise error
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the temporary folder


def test_refuses_to_overwrite_unless_asked_and_then_swaps(tmp_path, read_plain):
    rng = np.random.default_rng(3)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    with ShardWriter(out) as w:
        w.write(_samples(rng)[0])
    with pytest.raises(DataError, match="exists and is not empty.*--overwrite"):
        ShardWriter(out)
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old output intact
        with ShardWriter(out, overwrite=True) as w:
            w.write(_samples(rng)[1])
            raise RuntimeError("crash")
    assert len(read_plain(out)) == 1
    with ShardWriter(out, overwrite=True) as w:
        for s in _samples(rng):
            w.write(s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "streaming-tmp"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        ShardWriter(tmp_path / "file", overwrite=True)


def test_size_limit_and_compression_stay_readable(tmp_path, read_plain):
    rng = np.random.default_rng(4)
    samples = [robot_sample(image=_image(rng), instruction=f"step {t}", action=[t, 0.5], dataset="d", episode=0,
                            step=t) for t in range(40)]
    with ShardWriter(tmp_path / "out", size_limit=8000, compression="zstd") as w:
        for s in samples:
            w.write(s)
    assert w.summary["shards"] > 1
    assert any(p.name.endswith(".zstd") for p in (tmp_path / "out").iterdir())
    back = read_plain(tmp_path / "out")
    assert [s["instruction"] for s in back] == [f"step {t}" for t in range(40)]


def test_bad_rows_and_bad_options_are_data_errors(tmp_path):
    with ShardWriter(tmp_path / "a") as w:
        with pytest.raises(DataError, match="columns do not match"):
            w.write({"task": "robot"})
        row = robot_sample(image=np.zeros((4, 4, 3), np.uint8), instruction="x", action=[1.0], dataset="d",
                           episode=0, step=0)
        w.write(row)
    with pytest.raises(DataError, match="every sample was skipped"):
        with ShardWriter(tmp_path / "b"):
            pass
    assert not (tmp_path / "b").exists()
    with pytest.raises(DataError, match="compression"):
        ShardWriter(tmp_path / "c", compression="nope")
    with pytest.raises(DataError, match="non-finite"):
        robot_sample(image=np.zeros((4, 4, 3), np.uint8), instruction="x", action=[np.nan], dataset="d", episode=0,
                     step=0)
    with pytest.raises(DataError, match="image is missing"):
        robot_sample(image=b"", instruction="x", action=[1.0], dataset="d", episode=0, step=0)
    assert np.isnan(ABSENT).all() and ABSENT.shape == (1,)



def test_reading_back_leaves_no_shared_memory(tmp_path):
    """A process that read shards leaves no /dev/shm segments behind once it exits normally.

    streaming releases its segments at interpreter exit (atexit), not when a dataset is deleted,
    so the read_plain fixture's segments live until the pytest process ends; a killed process
    leaks them (MACHINE.md).
    """
    import os
    import subprocess
    import sys

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this platform")
    with ShardWriter(tmp_path / "out") as w:
        w.write(_samples(np.random.default_rng(5))[0])
    code = ("import sys, tempfile; tempfile.tempdir = sys.argv[2]\n"
            "from vla_scale.data.streaming_compat import import_streaming\n"
            "ds = import_streaming().StreamingDataset(local=sys.argv[1], shuffle=False, batch_size=1)\n"
            "assert ds[0]['instruction'] == 'pick up the red block'\n"
            "print(f'{ds._shm_prefix_int:06d}_')\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    prefix = done.stdout.strip().splitlines()[-1]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def test_many_datasets_in_one_process_keep_descriptors_flat_and_leave_no_shared_memory(tmp_path):
    """streaming keeps every shared-memory block (and its descriptor) alive until exit; a process that builds
    many datasets (the demo's runs, the ablation, a test session) ran out of descriptors. With
    `import_streaming` a dataset's blocks close when it is collected, and what it created is still unlinked
    at exit."""
    import os
    import subprocess
    import sys

    if not os.path.isdir("/dev/shm") or not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /dev/shm and /proc")
    with ShardWriter(tmp_path / "out") as w:
        w.write(_samples(np.random.default_rng(5))[0])
    code = ("import gc, os, sys, tempfile; tempfile.tempdir = sys.argv[2]\n"
            "from vla_scale.data.streaming_compat import import_streaming\n"
            "st = import_streaming()\n"
            "def fds(): return len(os.listdir('/proc/self/fd'))\n"
            "counts, prefixes = [], []\n"
            "for k in range(30):\n"
            "    ds = st.StreamingDataset(local=sys.argv[1], shuffle=False, batch_size=1)\n"
            "    assert ds[0]['instruction'] == 'pick up the red block'\n"
            "    prefixes.append(f'{ds._shm_prefix_int:06d}_')\n"
            "    del ds; gc.collect(); counts.append(fds())\n"
            "print(counts[2], counts[-1]); print(' '.join(prefixes))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    early, late = map(int, done.stdout.splitlines()[-2].split())
    assert late <= early + 2, (early, late)  # 27 more datasets, no more descriptors
    prefixes = done.stdout.splitlines()[-1].split()
    assert not [n for n in os.listdir("/dev/shm") if any(n.startswith(p) for p in prefixes)]
