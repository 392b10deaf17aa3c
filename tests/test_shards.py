"""The shard schema and the atomic ShardWriter: plain StreamingDataset reads back what we wrote."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from streaming_helpers import read_plain  # noqa: F401  (fixture)
from vla_scale.data.schema import ABSENT, COLUMNS, jpeg_bytes, optional_array, robot_sample, vl_sample
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
    with ShardWriter(tmp_path / "out") as w:
        for s in written:
            w.write(s)
    back = read_plain(tmp_path / "out")
    assert len(back) == len(written)
    for orig, pixels, got in zip(written, originals, back):
        assert set(got) == set(COLUMNS)
        for key in ("task", "dataset", "instruction", "turns"):
            assert got[key] == orig[key]
        assert int(got["episode"]) == orig["episode"] and int(got["step"]) == orig["step"]
        np.testing.assert_array_equal(got["action"], orig["action"])
        assert got["action"].dtype == np.float32
        np.testing.assert_array_equal(got["state"], orig["state"])
        assert got["wrist_image"] == orig["wrist_image"]  # bytes column: exact
        # JPEG is lossy: the shard holds exactly the JPEG of the image, which is close to the original
        image = np.asarray(got["image"].convert("RGB"))
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG")
        np.testing.assert_array_equal(image, np.asarray(Image.open(buf).convert("RGB")))
        assert _psnr(image, pixels) > 30
    robot, chunk, vl = back[0], back[3], back[4]
    assert chunk["action"].shape == (4, 7)
    assert optional_array(chunk["state"]) is None and optional_array(robot["state"]).shape == (8,)
    assert optional_array(vl["action"]) is None and vl["episode"] == -1 and vl["turns"][0]["answer"].startswith("[(")
    wrist = np.asarray(Image.open(io.BytesIO(robot["wrist_image"])).convert("RGB"))
    assert _psnr(wrist, np.asarray(Image.open(io.BytesIO(written[0]["wrist_image"])).convert("RGB"))) > 99
    assert vl["wrist_image"] == b""


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
    assert jpeg_bytes(np.zeros((4, 4, 3), np.uint8))[:2] == b"\xff\xd8"
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
