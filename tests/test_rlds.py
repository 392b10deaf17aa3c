"""`vla-scale convert rlds`: an RLDS dataset written with TFDS's own writer (images, a language instruction,
7-D actions) converts exactly; the OXE fractal and bridge standardisations map their action dicts.

Needs the optional extra `vla-scale[rlds]` (tensorflow-datasets + tensorflow-cpu, about 600 MB): the
tests skip, saying so, only when it is not installed."""
import numpy as np
import pytest

from streaming_helpers import read_plain  # noqa: F401  (fixture)
from vla_scale.data.camera_images import decode_camera_image
from vla_scale.data.converters.rlds import rel2abs_gripper
from vla_scale.errors import DataError

tfds = pytest.importorskip("tensorflow_datasets", reason="the optional extra vla-scale[rlds] is not installed")

LENGTHS = (4, 3, 5)


def _frame(e, t):
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 0] = 20 * e + 10
    img[..., 1] = 30 * t + 5
    return img


def _write_toy_rlds(data_dir):
    class ToyRlds(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "steps": tfds.features.Dataset({
                    "observation": tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(16, 16, 3)),
                        "state": tfds.features.Tensor(shape=(3,), dtype=np.float32)}),
                    "action": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                    "language_instruction": tfds.features.Text(),
                    "is_first": np.bool_, "is_last": np.bool_, "is_terminal": np.bool_,
                    "reward": np.float32, "discount": np.float32}),
                "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for e, n in enumerate(LENGTHS):
                steps = [{"observation": {"image": _frame(e, t), "state": np.array([e, t, 0.5], np.float32)},
                          "action": np.array([e, t, 0.1, 0.2, 0.3, 0.4, t % 2], np.float32),
                          "language_instruction": f"put the block in bowl {e}",
                          "is_first": t == 0, "is_last": t == n - 1, "is_terminal": t == n - 1,
                          "reward": float(t == n - 1), "discount": 1.0} for t in range(n)]
                yield f"episode_{e}", {"steps": steps, "episode_metadata": {"file_path": f"ep{e}"}}

    builder = ToyRlds(data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder.data_path


def test_an_rlds_dataset_written_by_tfds_converts_exactly(tmp_path, read_plain):
    from vla_scale.data.converters import convert_rlds

    src = _write_toy_rlds(tmp_path / "tfds")
    summary = convert_rlds(src, tmp_path / "out", progress=False)
    assert summary["samples"] == sum(LENGTHS) and summary["episodes"] == len(LENGTHS)
    samples = read_plain(tmp_path / "out")
    # TFDS may store episodes in any order; each must be whole, in step order, and exact.
    by_episode = {}
    for s in samples:
        by_episode.setdefault(int(s["episode"]), []).append(s)
    seen = set()
    for rows in by_episode.values():
        e = int(rows[0]["action"][0])
        seen.add(e)
        assert [int(r["step"]) for r in rows] == list(range(LENGTHS[e]))
        for t, r in enumerate(rows):
            np.testing.assert_array_equal(r["action"], np.array([e, t, 0.1, 0.2, 0.3, 0.4, t % 2], np.float32))
            np.testing.assert_array_equal(r["state"], np.array([e, t, 0.5], np.float32))
            assert r["instruction"] == f"put the block in bowl {e}"
            img = np.asarray(decode_camera_image(r["image"])).astype(int)
            assert np.abs(img - _frame(e, t)).max() <= 3
    assert seen == set(range(len(LENGTHS)))
    with pytest.raises(DataError, match="not one of"):
        convert_rlds(src, tmp_path / "o2", rlds_config="nope", progress=False)
    from vla_scale.cli import main

    assert main(["convert", "rlds", str(src), str(tmp_path / "cli"), "--split", "train", "--no-progress"]) == 0
    assert len(read_plain(tmp_path / "cli")) == sum(LENGTHS)


def test_oxe_gripper_standardisation_follows_openvla():
    # RT-1's relative gripper: < -0.1 opens, > 0.1 closes, 0 keeps; absolute 1 = open, 0 = closed.
    np.testing.assert_array_equal(rel2abs_gripper(np.array([0, 0, 1, 0, 0, -1, 0])), [1, 1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(rel2abs_gripper(np.array([0, 0, -1, 0])), [0, 0, 1, 1])
    np.testing.assert_array_equal(rel2abs_gripper(np.zeros(3)), [1, 1, 1])
