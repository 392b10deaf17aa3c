"""Input pipeline throughput: samples/s of read + JPEG decode + augment + tokenize + collate (a script).

    python benchmarks/dataloader.py [--samples 2048] [--steps 40] [--out benchmarks/results/dataloader_cpu.json]
    python benchmarks/dataloader.py --s3 [--out benchmarks/results/dataloader_s3_cpu.json]

Writes a co-training set of 224x224 images as MDS shards (the four sources
at the paper's mix), then times `CoTrainingLoader.next_step()` - exactly
what the trainer calls - with 0, 1 and 2 loader workers, augmentation on
and off. The first steps (worker start-up, shard index reads) are excluded.
The baseline in the same run is 0 workers. Prints a table and writes JSON.

--s3 --chunk-cameras: also robot episodes (32 steps) with a wrist camera, read
from the server as 8-step action chunks with both cameras through the encoders
(`actions.chunk=8`, `data.cameras=[primary, wrist]`), cold and warm.

--s3: the same shards uploaded to a real S3-compatible server on loopback
(SeaweedFS's `weed`, from the test extra; tests/object_store.py) and read
as s3:// sources through the shard cache: a cold cache (every shard
downloaded and hash-checked during the timed steps), then a warm one (the
same cache folder, a new loader), against the local folders in the same
run. Every row is timed from the first step (downloads are the point), with
setup (index download, dataset construction) reported apart.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024, help="samples per source")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=None, help="default: results/dataloader_cpu.json (results/dataloader_s3_cpu.json "
                                                "with --s3)")
    ap.add_argument("--s3", action="store_true", help="streaming from a loopback S3 server, cold and warm cache")
    ap.add_argument("--workers", type=int, default=2, help="--s3: loader workers per row")
    ap.add_argument("--chunk-cameras", action="store_true",
                    help="--s3: also robot episodes with a wrist camera, read as 8-step chunks with both cameras")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(Path(__file__).parent / "results" / ("dataloader_s3_cpu.json" if args.s3 else
                                                            "dataloader_cpu.json"))
    if args.s3:
        return remote_main(args)

    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.config import load_config
    from vla_scale.data.pipeline import build_data
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.models.loading import load_tokenizer
    from vla_scale.models.tiny import build_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="vla-dataloader-bench-"))
    os.environ["TMPDIR"] = str(work / "tmp")
    (work / "tmp").mkdir()
    tempfile.tempdir = str(work / "tmp")
    src = build_tiny_llava(work / "src", image_size=224, patch_size=14)
    tok = load_tokenizer(src)
    rows = []
    for augment in (False, True):
        for workers in (0, 1, 2):
            cfg = load_config(None, [
                f"model.source={src}", "model.image_size=224", f"run.output_dir={work / 'run'}",
                "model.encoders=[{name: frozen}, {name: trained, trainable: true}]",
                f"data.synthetic.samples_per_source={args.samples}", "data.synthetic.image_size=224",
                f"data.num_workers={workers}", f"data.augment={str(augment).lower()}",
                f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}"])
            prompts = PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length)
            t0 = time.perf_counter()
            loader, _ = build_data(cfg, prompts)  # the first call writes the shards (not timed below)
            setup = time.perf_counter() - t0
            warm = 3
            for _ in range(warm):
                loader.next_step()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loader.next_step()
            dt = time.perf_counter() - t0
            sps = args.steps * args.batch / dt
            rows.append({"augment": augment, "workers": workers, "samples_per_s": sps, "setup_s": setup})
            print(f"augment={augment!s:5} workers={workers}: {sps:8.1f} samples/s")
            del loader
    base = {r["augment"]: r["samples_per_s"] for r in rows if r["workers"] == 0}
    for r in rows:
        r["speedup_vs_0_workers"] = r["samples_per_s"] / base[r["augment"]]
    result = {"benchmark": "dataloader", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "image_size": 224, "batch": args.batch,
              "steps": args.steps, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def write_episodes(out: Path, samples: int, image_size: int, steps: int = 32) -> None:
    """Robot shards as a converter writes them: episodes of `steps` per-step rows, primary and wrist images
    (smooth random JPEGs, so their size is realistic), 7-D actions."""
    import numpy as np

    from vla_scale.data.schema import robot_sample
    from vla_scale.data.writer import ShardWriter

    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, image_size, dtype=np.float32)
    with ShardWriter(out, size_limit=1 << 24) as w:
        for i in range(samples):
            ep, t = divmod(i, steps)
            imgs = [np.clip(base[None, :, None] * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 8, (image_size, 1, 3)),
                            0, 255).astype(np.uint8) for _ in range(2)]  # (S, S, 3): a gradient, noisy per row
            w.write(robot_sample(image=imgs[0], wrist_image=imgs[1], instruction="pick up the red block",
                                 action=rng.uniform(-1, 1, 7).astype(np.float32), dataset="bench", episode=ep,
                                 step=t))


def remote_main(args) -> None:
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from object_store import LoopbackS3

    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.config import load_config
    from vla_scale.data import storage
    from vla_scale.data.pipeline import build_data
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.models.loading import load_tokenizer
    from vla_scale.models.tiny import build_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="vla-dataloader-s3-bench-"))
    os.environ["TMPDIR"] = str(work / "tmp")
    (work / "tmp").mkdir()
    tempfile.tempdir = str(work / "tmp")
    src = build_tiny_llava(work / "src", image_size=224, patch_size=14)
    tok = load_tokenizer(src)
    names = ("robot", "vqa", "spatial", "affordance")
    base = [f"model.source={src}", "model.image_size=224", "model.encoders=[{name: frozen}, {name: trained, "
            "trainable: true}]", f"data.synthetic.samples_per_source={args.samples}", "data.synthetic.image_size=224",
            f"data.num_workers={args.workers}", f"train.global_batch_size={args.batch}",
            f"train.micro_batch_size={args.batch}"]
    rows = []
    with LoopbackS3(work / "s3") as s3:
        s3.create_bucket("bench")
        os.environ.update(s3.env)

        def timed(label: str, overrides: list[str]) -> None:
            cfg = load_config(None, [*base, *overrides])
            prompts = PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length)
            t0 = time.perf_counter()
            loader, _ = build_data(cfg, prompts)
            setup = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loader.next_step()
            dt = time.perf_counter() - t0
            sps = args.steps * args.batch / dt
            rows.append({"source": label, "workers": args.workers, "samples_per_s": sps, "setup_s": setup})
            print(f"{label:14} workers={args.workers}: {sps:8.1f} samples/s (setup {setup:.1f} s)")
            del loader

        # The local shards (written on the first build), then the same folders uploaded, index.json last.
        timed("local", [f"run.output_dir={work / 'run'}"])
        data = work / "run" / "data"
        total = 0
        for name in names:
            files = sorted(p.name for p in (data / name).iterdir() if p.name != "index.json")
            storage.upload(data / name, f"s3://bench/{name}", files + ["index.json"])
            total += sum((data / name / f).stat().st_size for f in files)
        remote = "[" + ", ".join(f"{{name: {n}, task: {n}, path: 's3://bench/{n}', weight: {w}}}"
                                 for n, w in zip(names, (0.5, 0.25, 0.125, 0.125))) + "]"
        cache = work / "cache"
        common = [f"run.output_dir={work / 'run_s3'}", f"data.sources={remote}", f"data.storage.cache_dir={cache}"]
        timed("s3 cold cache", common)
        timed("s3 warm cache", common)
        shutil.rmtree(cache, ignore_errors=True)
        # Today's policies: robot episodes with a wrist camera, read as 8-step action chunks, both cameras
        # through the encoders (data.cameras), from the same server.
        if args.chunk_cameras:
            robot2 = work / "robot_two_cameras"
            write_episodes(robot2, args.samples, image_size=224)
            files = sorted(p.name for p in robot2.iterdir() if p.name != "index.json")
            storage.upload(robot2, "s3://bench/robot_two_cameras", files + ["index.json"])
            two = remote.replace("path: 's3://bench/robot'", "path: 's3://bench/robot_two_cameras'")
            extra = [f"data.sources={two}", "actions.chunk=8", "data.cameras=[primary, wrist]"]
            timed("s3 cold, chunk 8 + 2 cameras", [*common[:1], f"data.storage.cache_dir={cache}", *extra])
            timed("s3 warm, chunk 8 + 2 cameras", [*common[:1], f"data.storage.cache_dir={cache}", *extra])
            shutil.rmtree(cache, ignore_errors=True)
    local = rows[0]["samples_per_s"]
    for r in rows:
        r["vs_local"] = r["samples_per_s"] / local
    result = {"benchmark": "dataloader_s3", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "image_size": 224, "batch": args.batch,
              "steps": args.steps, "samples_per_source": args.samples, "shard_bytes": total,
              "server": "SeaweedFS weed server -s3 on 127.0.0.1", "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
