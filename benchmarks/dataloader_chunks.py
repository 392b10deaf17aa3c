"""Input pipeline cost of action chunks and a second camera: samples/s of `CoTrainingLoader.next_step()`.

    python benchmarks/dataloader_chunks.py [--episodes 16] [--steps-per-episode 64] [--steps 20]
                                           [--out benchmarks/results/dataloader_chunks_cpu.json]

Writes per-step robot shards (224x224 primary and wrist cameras, 7-D actions, episodes of
`--steps-per-episode` steps) with the project's own `ShardWriter`, then times the loader for
chunk 1 / chunk 8 and one / two cameras, 0 loader workers, augmentation off. Chunk 8 reads the 7
following rows of each robot sample (their action/episode/step columns only); the second camera
decodes and resizes one more JPEG per sample. The baseline in the same run is chunk 1 with one
camera. The first steps are excluded. Prints a table and writes JSON.
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

import numpy as np
import torch


def write_shards(out: Path, episodes: int, steps: int, size: int = 224) -> None:
    from vla_scale.data.schema import robot_sample
    from vla_scale.data.writer import ShardWriter

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    with ShardWriter(out) as w:
        for ep in range(episodes):
            for t in range(steps):
                base = np.stack([x, y, np.full_like(x, (ep * 37 + t) % 255)], -1) % 255
                noise = rng.integers(0, 20, (size, size, 3))
                img = (base + noise).clip(0, 255).astype(np.uint8)
                w.write(robot_sample(image=img, wrist_image=img[::-1].copy(), instruction="pick up the red block",
                                     action=rng.normal(0, 0.3, 7).astype(np.float32), state=rng.normal(0, 1, 8),
                                     dataset="bench", episode=ep, step=t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--steps-per-episode", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dataloader_chunks_cpu.json"))
    args = ap.parse_args()

    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.config import load_config
    from vla_scale.data.pipeline import build_data
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.data.stats import stats_for_shards
    from vla_scale.models.loading import load_tokenizer
    from vla_scale.models.tiny import build_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="vla-chunks-bench-"))
    os.environ["TMPDIR"] = str(work / "tmp")
    (work / "tmp").mkdir()
    tempfile.tempdir = str(work / "tmp")
    src = build_tiny_llava(work / "src", image_size=224, patch_size=14)
    tok = load_tokenizer(src)
    shards = work / "shards"
    write_shards(shards, args.episodes, args.steps_per_episode)
    stats_for_shards(shards)
    rows = []
    for chunk in (1, 8):
        for cameras in (["primary"], ["primary", "wrist"]):
            cfg = load_config(None, [
                f"model.source={src}", "model.image_size=224", f"run.output_dir={work / 'run'}",
                "model.encoders=[{name: frozen}, {name: trained, trainable: true}]",
                f"data.sources=[{{name: robot, task: robot, path: '{shards}', weight: 1.0}}]",
                f"actions.chunk={chunk}", f"data.cameras=[{', '.join(cameras)}]", "data.max_length=1024",
                f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}"])
            prompts = PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length)
            loader, _ = build_data(cfg, prompts)
            for _ in range(3):
                loader.next_step()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loader.next_step()
            dt = time.perf_counter() - t0
            rows.append({"chunk": chunk, "cameras": len(cameras), "samples_per_s": args.steps * args.batch / dt})
            del loader
    # The chunk's own cost, without image decoding and tokenising: reading one sample by id.
    from vla_scale.data.chunks import ChunkedCoTrainingDataset
    from vla_scale.data.streaming_dataset import CoTrainingDataset

    reads = {}
    n = args.episodes * args.steps_per_episode
    for name, cls, kw in (("get_item", CoTrainingDataset, {}), ("get_item_chunk8", ChunkedCoTrainingDataset,
                                                                 {"chunk": 8})):
        ds = cls(local=str(shards), shuffle=False, batch_size=1, batching_method="random", **kw)
        for i in range(min(n, 64)):
            ds[i]
        t0 = time.perf_counter()
        for i in range(n):
            ds[i]
        reads[name] = (time.perf_counter() - t0) / n * 1e6
        del ds
    print(f"read one sample by id: {reads['get_item']:.0f} us; with its chunk of 8: {reads['get_item_chunk8']:.0f} us")
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["vs_baseline"] = r["samples_per_s"] / base
    print(f"{'chunk':>6} {'cameras':>8} {'samples/s':>10} {'vs chunk 1, 1 camera':>22}")
    for r in rows:
        print(f"{r['chunk']:>6} {r['cameras']:>8} {r['samples_per_s']:>10.1f} {r['vs_baseline']:>22.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "dataloader_chunks", "date": datetime.date.today().isoformat(),
                               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
                               "batch": args.batch, "steps": args.steps, "image_size": 224, "workers": 0,
                               "rows": rows, "read_us_per_sample": reads}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
