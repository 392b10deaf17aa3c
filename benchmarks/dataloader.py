"""Input pipeline throughput: samples/s of read + JPEG decode + augment + tokenize + collate (a script).

    python benchmarks/dataloader.py [--samples 2048] [--steps 40] [--out benchmarks/results/dataloader_cpu.json]

Writes a co-training set of 224x224 images as MDS shards (the four sources
at the paper's mix), then times `CoTrainingLoader.next_step()` - exactly
what the trainer calls - with 0, 1 and 2 loader workers, augmentation on
and off. The first steps (worker start-up, shard index reads) are excluded.
The baseline in the same run is 0 workers. Prints a table and writes JSON.
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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dataloader_cpu.json"))
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
