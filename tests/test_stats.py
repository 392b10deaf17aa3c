"""Action statistics: one streaming pass, quantiles within the documented bound of numpy's exact ones."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vla_scale.actions import ActionNormalizer
from vla_scale.cli import main
from vla_scale.data.schema import STATS_FILE, robot_sample, vl_sample
from vla_scale.data.stats import (ActionStatistics, AlignedHistogram, compute_action_stats, load_stats,
                                  stats_for_shards)
from vla_scale.data.writer import ShardWriter
from vla_scale.errors import DataError


def _distributions(rng, n=20000):
    return {
        "uniform": rng.uniform(-1, 1, n),
        "lognormal (skewed)": rng.lognormal(0, 1.5, n),
        "student-t df=1.5 (heavy tails)": rng.standard_t(1.5, n),
        "exponential, mostly tiny": rng.exponential(1e-4, n) * np.where(rng.random(n) < 0.99, 1, 1e4),
        "large offset": 1e6 + rng.normal(0, 1e-2, n),
        "gripper {0,1}": rng.integers(0, 2, n).astype(float),
        "few distinct values": rng.choice([-0.3, 0.0, 0.25, 7.0], n),
        "constant": np.full(n, 0.37),
    }


def _check(sketch, data, qs=(0.01, 0.99, 0.5, 0.1, 0.0, 1.0)):
    span = data.max(axis=0) - data.min(axis=0)
    for q in qs:
        exact = np.quantile(data, q, axis=0)
        est = sketch.quantile(q)
        err = np.abs(est - exact)
        assert (err <= 1e-3 * span + 1e-12).all(), (q, err / np.maximum(span, 1e-300))
        assert (err <= sketch.error_bound() * (1 + 1e-9) + 1e-12).all(), (q, err, sketch.error_bound())


@pytest.mark.parametrize("order", ["random", "ascending", "descending", "outliers last"])
def test_quantiles_match_numpy_within_the_bound(order):
    rng = np.random.default_rng(0)
    dists = _distributions(rng)
    data = np.stack(list(dists.values()), axis=1)
    if order == "ascending":
        data = np.sort(data, axis=0)  # the range grows with every batch: many re-binnings
    elif order == "descending":
        data = np.sort(data, axis=0)[::-1]
    elif order == "outliers last":
        data = data[np.argsort(np.abs(data[:, 2]))]
    sketch = AlignedHistogram(data.shape[1])
    for batch in np.array_split(data, 37):
        sketch.update(batch)
    assert sketch.n == len(data)
    np.testing.assert_array_equal(sketch.min, data.min(axis=0))
    np.testing.assert_array_equal(sketch.max, data.max(axis=0))
    _check(sketch, data)
    for col in (5, 6, 7):  # discrete data (gripper, few values, constant): one value per bin, so exact
        for q in (0.01, 0.99, 0.5):
            np.testing.assert_allclose(sketch.quantile(q)[col], np.quantile(data[:, col], q), rtol=1e-12, atol=1e-12)
    span = data.max(axis=0) - data.min(axis=0)
    big = span > 0
    assert (sketch.error_bound()[big] < span[big] / (sketch.bins - 2) + 1e-9).all()  # the documented guarantee


def test_sketches_merge_as_if_one_saw_everything():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (5000, 3)), rng.standard_t(2, (7000, 3)) * 10
    one, left, right = AlignedHistogram(3), AlignedHistogram(3), AlignedHistogram(3)
    one.update(np.concatenate([a, b]))
    left.update(a)
    right.update(b)
    left.merge(right)
    both = np.concatenate([a, b])
    _check(left, both)
    for q in (0.01, 0.99):
        np.testing.assert_allclose(left.quantile(q), one.quantile(q), atol=float(one.error_bound().max()) * 2)


def test_moments_and_gripper_detection_match_numpy():
    rng = np.random.default_rng(2)
    data = np.concatenate([rng.normal(3, 2, (9000, 2)), rng.integers(0, 2, (9000, 1)), np.full((9000, 1), 5.0)],
                          axis=1)
    acc = ActionStatistics()
    for batch in np.array_split(data, 11):
        acc.update(batch)
    stats = acc.result()
    np.testing.assert_allclose(stats["mean"], data.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], data.std(axis=0), rtol=1e-5, atol=1e-12)
    assert stats["count"] == 9000 and stats["mask"] == [True, True, False, True] and stats["binary_dims"] == [2]
    assert acc.result(keep_dims=[3])["mask"] == [True, True, True, False]
    with pytest.raises(DataError, match="out of range"):
        acc.result(keep_dims=[4])


def _write_robot_shards(out, rng, chunk=False, compression=None, extra_vl=True):
    actions = []
    with ShardWriter(out, size_limit=20000, compression=compression) as w:
        for ep in range(6):
            for t in range(25):
                a = np.concatenate([rng.standard_t(3, 5) * [1, 2, 3, 0.1, 1e-3], [float(rng.integers(0, 2))]])
                if chunk:
                    a = np.stack([a, a + [1, 1, 1, 1, 1, 0], a - [2, 2, 2, 2, 2, 0]])  # (T=3, D=6), gripper stays 0/1
                actions.append(np.asarray(a, np.float32).reshape(-1, 6))
                w.write(robot_sample(image=np.zeros((8, 8, 3), np.uint8), instruction="go", action=a, dataset="d",
                                     episode=ep, step=t))
                if extra_vl and t % 10 == 0:
                    w.write(vl_sample(image=np.zeros((8, 8, 3), np.uint8), task="vqa", dataset="v",
                                      turns=[{"question": "q?", "answer": "a"}]))
    return np.concatenate(actions).astype(np.float64)


@pytest.mark.parametrize("chunk,compression", [(False, None), (True, "zstd")])
def test_stats_of_shards_match_numpy_and_feed_the_normalizer(tmp_path, chunk, compression):
    rng = np.random.default_rng(3)
    data = _write_robot_shards(tmp_path / "shards", rng, chunk=chunk, compression=compression)
    stats, path = stats_for_shards(tmp_path / "shards")
    assert path == tmp_path / "shards" / STATS_FILE and load_stats(tmp_path / "shards") == stats
    span = data.max(axis=0) - data.min(axis=0)
    for key, q in (("q01", 0.01), ("q99", 0.99)):
        assert (np.abs(np.array(stats[key]) - np.quantile(data, q, axis=0)) <= 1e-3 * span).all()
    np.testing.assert_allclose(stats["mean"], data.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], data.std(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(stats["min"], data.min(axis=0))
    np.testing.assert_array_equal(stats["max"], data.max(axis=0))
    assert stats["count"] == len(data) and stats["samples"] == 150 and stats["dim"] == 6
    assert stats["mask"] == [True] * 5 + [False]  # the {0,1} gripper is kept raw
    norm = ActionNormalizer.from_stats(json.loads(path.read_text()))
    assert norm.dim == 6 and not norm.mask[5]
    x = norm.normalize(data[:10])
    assert np.all(np.abs(x[:, :5]) <= 1) and np.array_equal(x[:, 5], data[:10, 5])


def test_each_dataset_gets_its_own_stats_via_the_cli(tmp_path, capsys):
    rng = np.random.default_rng(4)
    _write_robot_shards(tmp_path / "a", rng)
    _write_robot_shards(tmp_path / "b", rng, chunk=True)
    assert main(["stats", str(tmp_path / "a"), str(tmp_path / "b"), "--keep-dims", "none", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {str(tmp_path / "a" / STATS_FILE), str(tmp_path / "b" / STATS_FILE)}
    assert load_stats(tmp_path / "a")["mask"] == [True] * 6
    assert load_stats(tmp_path / "b")["count"] == 3 * load_stats(tmp_path / "a")["count"]
    assert main(["stats", str(tmp_path / "a"), "--keep-dims", "4,5", "--out", str(tmp_path / "s.json"),
                 "--no-progress"]) == 0
    assert load_stats(tmp_path / "s.json")["mask"] == [True] * 4 + [False, False]
    assert not any(p.name.startswith(".") for p in (tmp_path / "a").iterdir())  # no temporary file left behind
    assert main(["stats", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "index.json is missing" in capsys.readouterr().err


def test_mixed_action_spaces_and_vl_only_folders_are_errors(tmp_path):
    with ShardWriter(tmp_path / "mixed") as w:
        for d in (3, 4):
            w.write(robot_sample(image=np.zeros((8, 8, 3), np.uint8), instruction="go", action=np.ones(d), dataset="d",
                                 episode=d, step=0))
    with pytest.raises(DataError, match="4 dimensions, earlier samples have 3"):
        compute_action_stats(tmp_path / "mixed")
    with ShardWriter(tmp_path / "vl") as w:
        w.write(vl_sample(image=np.zeros((8, 8, 3), np.uint8), task="vqa", dataset="v",
                          turns=[{"question": "q?", "answer": "a"}]))
    with pytest.raises(DataError, match="no robot actions"):
        compute_action_stats(tmp_path / "vl")
