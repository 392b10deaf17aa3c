"""Shard integrity: hashes written and checked, damage named, absurd actions reported.

A user relies on: one flipped byte or a truncated copy of a shard never becomes training data or
statistics silently; the error names the shard (and the sample when the damage is in its layout);
and `vla-scale stats` reports non-finite or absurd actions by episode and step instead of letting
one -2.56e38 ruin the normalisation.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from vla_scale.cli import main
from vla_scale.data.schema import robot_sample, vl_sample
from vla_scale.data.stats import compute_action_stats
from vla_scale.data.writer import ShardWriter
from vla_scale.errors import DataError


@pytest.fixture(autouse=True)
def _own_tmpdir(tmp_path, monkeypatch):
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(d))


def _actions(rng, episodes=5, steps=20):
    a = rng.normal(0, 0.2, (episodes, steps, 7)).astype(np.float32)
    a[..., 6] = rng.integers(0, 2, (episodes, steps))
    return a


def _write(out, actions, size_limit=4000, vl_every=0):
    with ShardWriter(out, size_limit=size_limit) as w:
        for e, ep in enumerate(actions):
            for t, a in enumerate(ep):
                w.write(robot_sample(image=np.full((8, 8, 3), t, np.uint8), instruction="go", action=a, dataset="d",
                                     episode=e, step=t))
                if vl_every and t % vl_every == 0:
                    w.write(vl_sample(image=np.zeros((8, 8, 3), np.uint8), task="vqa", dataset="v",
                                      turns=[{"question": "q?", "answer": "a"}]))
    return json.loads((out / "index.json").read_text())["shards"]


def _action_offset(path, sample):
    """Byte offset of a sample's action column in an MDS shard (the layout streaming writes)."""
    from vla_scale.data.stats import _samples

    shard = next(s for s in json.loads((path.parent / "index.json").read_text())["shards"]
                 if s["raw_data"]["basename"] == path.name)
    buf = path.read_bytes()
    for i, cols in _samples(buf, shard, str(path)):
        if i == sample:
            return buf.find(bytes(cols["action"]))
    raise AssertionError("no such sample")


def test_a_flipped_byte_is_found_by_stats_and_by_training_and_names_the_shard(tmp_path, tiny_config, tiny_llava):
    shards = _write(tmp_path / "robot", _actions(np.random.default_rng(0)))
    assert len(shards) > 2 and all(s["raw_data"]["hashes"].keys() == {"sha1", "xxh64"} for s in shards)
    victim = tmp_path / "robot" / shards[1]["raw_data"]["basename"]
    data = bytearray(victim.read_bytes())
    data[_action_offset(victim, 2) + 3] ^= 0xFF  # the exponent byte of action[0]: a huge value, like the issue's
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{victim}: the shard file is corrupt: its xxh64 hash"):
        compute_action_stats(tmp_path / "robot")
    # Training reads the local folder through streaming, which checks nothing itself: we check each shard
    # the first time a process opens it.
    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.data.pipeline import build_data
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.data.stats import stats_for_shards
    from vla_scale.models.loading import load_tokenizer

    clean = tmp_path / "clean"
    _write(clean, _actions(np.random.default_rng(0)))
    stats_for_shards(clean, out=tmp_path / "stats.json")
    cfg = tiny_config(f"data.sources=[{{name: robot, task: robot, path: '{tmp_path / 'robot'}', "
                      f"stats: '{tmp_path / 'stats.json'}'}}]", "train.global_batch_size=4", "train.micro_batch_size=4")
    tok = load_tokenizer(tiny_llava)
    loader, _ = build_data(cfg, PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length))
    with pytest.raises(DataError, match=rf"{victim}: the shard file is corrupt"):
        for _ in range(30):  # 100 samples, 4 per step: every shard is opened
            loader.next_step()


def test_a_truncated_shard_names_the_shard_and_the_first_sample_cut_off(tmp_path):
    shards = _write(tmp_path / "robot", _actions(np.random.default_rng(1)))
    victim = tmp_path / "robot" / shards[0]["raw_data"]["basename"]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=rf"{victim}: the shard file is truncated: {len(data) // 2} bytes, "
                                        rf"index.json says {len(data)}"):
        compute_action_stats(tmp_path / "robot")
    # Shards written without hashes or sizes (older writers): the sample layout itself is checked.
    index = json.loads((tmp_path / "robot" / "index.json").read_text())
    for s in index["shards"]:
        s["raw_data"].pop("bytes")
        s["raw_data"]["hashes"] = {}
    (tmp_path / "robot" / "index.json").write_text(json.dumps(index))
    n = shards[0]["samples"]
    with pytest.raises(DataError, match=rf"{victim}, sample \d+: the shard file is truncated: .* of {n} samples are "
                                        rf"cut off"):
        compute_action_stats(tmp_path / "robot")


def test_nonfinite_and_absurd_actions_are_reported_by_episode_and_step_and_left_out(tmp_path, capsys):
    actions = _actions(np.random.default_rng(2))
    out = tmp_path / "robot"
    _write(out, actions, vl_every=7)
    # Damage two stored actions after writing (the converters refuse such values on the way in): an
    # absurd value and a NaN, with the hashes rewritten so that only the values are wrong.
    index = json.loads((out / "index.json").read_text())
    bad = {(1, 4): -2.56e38, (3, 17): np.nan}
    from vla_scale.data.stats import _samples
    import streaming.base.hashing as hashing

    for shard in index["shards"]:
        path = out / shard["raw_data"]["basename"]
        buf = bytearray(path.read_bytes())
        for i, cols in list(_samples(bytes(buf), shard, str(path))):
            from streaming.base.format.mds.encodings import mds_decode, mds_encode

            key = (int(mds_decode("int64", bytes(cols["episode"]))), int(mds_decode("int64", bytes(cols["step"]))))
            if key in bad:
                raw = bytes(cols["action"])
                at = bytes(buf).find(raw)
                a = mds_decode("ndarray:float32", raw).copy()
                a[2] = bad[key]
                new = mds_encode("ndarray:float32", a)
                assert len(new) == len(raw)
                buf[at:at + len(raw)] = new
        path.write_bytes(bytes(buf))
        shard["raw_data"]["hashes"] = {k: hashing.get_hash(k, bytes(buf)) for k in shard["raw_data"]["hashes"]}
    (out / "index.json").write_text(json.dumps(index))
    assert main(["stats", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "2 robot sample(s) with non-finite or absurd actions" in err
    stats = json.loads((out / "stats.json").read_text())
    reported = {(o["episode"], o["step"]): o["reason"] for o in stats["outliers"]["examples"]}
    assert set(reported) == {(1, 4), (3, 17)} and stats["outliers"]["count"] == 2
    assert "absurd value -2.56e+38 in dimension 2" in reported[(1, 4)]
    assert "non-finite value nan in dimension 2" in reported[(3, 17)]
    # Left out: the statistics are those of the other 98 actions, exactly.
    keep = np.ones(actions.shape[:2], bool)
    keep[1, 4] = keep[3, 17] = False
    rest = actions[keep].astype(np.float64)
    assert stats["count"] == 98 and stats["samples"] == 98
    np.testing.assert_array_equal(stats["min"], rest.min(axis=0))
    np.testing.assert_array_equal(stats["max"], rest.max(axis=0))
    np.testing.assert_allclose(stats["mean"], rest.mean(axis=0), rtol=1e-6)
    span = rest.max(axis=0) - rest.min(axis=0)
    assert (np.abs(np.array(stats["q99"]) - np.quantile(rest, 0.99, axis=0)) <= 1e-3 * span).all()
    # A larger factor still reports the NaN; a factor that flags nothing real keeps every finite action.
    loose = compute_action_stats(out, outlier_factor=1e40)
    assert loose["outliers"]["count"] == 1 and loose["count"] == 99
