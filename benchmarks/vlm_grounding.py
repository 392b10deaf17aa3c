"""Can the tiny source VLM learn to ground words in images? (The demo's bottleneck, BENCHMARKS.md 9b.)

    python benchmarks/vlm_grounding.py --out benchmarks/results/vlm_grounding.json [--steps 600] [--hidden 64]

Trains the demo's VLM stage (`vla_scale.demo.vlm_stage.train_vlm`, the product's own code) from the same
random tiny LLaVA on small tasks, each against its baseline in the same run (the majority answer of the
held-out set), and reports held-out exact answers and the image-reliance gap (loss with another
example's image minus the loss):

- `one_square`: one 10 px square on grey, "What colour is the block?" (no word to bind);
- `squares_presence`: three squares of distinct colours, "Is there a red block?" (binding a word of the
  question to one of several objects, as "pick up the red block" needs);
- `scene_presence`: the same question on freshly reset MuJoCo tabletop scenes.

A fast loop for trying model or recipe changes (seconds to minutes per task on a CPU) before spending the
demo's budget.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 230), "yellow": (240, 220, 30),
           "purple": (140, 40, 180), "orange": (255, 128, 13)}


def squares(n: int, k: int, presence: bool, rng: np.random.Generator):
    from vla_scale.demo.vlm_stage import VLRecord

    out = []
    names = list(COLOURS)
    for _ in range(n):
        present = rng.choice(len(names), k, replace=False)
        img = np.full((128, 128, 3), 140, np.uint8)
        for c in present:
            x, y = rng.integers(0, 118, 2)
            img[y:y + 10, x:x + 10] = COLOURS[names[c]]
        if presence:
            q = int(rng.integers(len(names)))
            out.append(VLRecord(img, f"Is there a {names[q]} block?", "yes" if q in present else "no", "vqa"))
        else:
            out.append(VLRecord(img, "What colour is the block?", names[present[0]], "vqa"))
    return out


def scene_presence(n: int, rng: np.random.Generator):
    from vla_scale.demo.vlm_stage import VLRecord
    from vla_scale.eval.mujoco_backend import OBJECT_COLOURS, MujocoBackend

    out = []
    with MujocoBackend(cameras=("primary",), image_size=128) as backend:
        for _ in range(n):
            obs = backend.reset("pick_place", int(rng.integers(2**31)))
            names = list(backend.scene().objects)
            c = list(OBJECT_COLOURS)[int(rng.integers(len(OBJECT_COLOURS)))]
            out.append(VLRecord(obs.images["primary"], f"Is there {'an' if c[0] in 'aeiou' else 'a'} {c} block?",
                                "yes" if c in names else "no", "vqa"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--held-out", type=int, default=200)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tasks", nargs="+", default=["one_square", "squares_presence", "scene_presence"])
    args = p.parse_args(argv)

    from vla_scale.demo.vlm_stage import train_vlm
    from vla_scale.models.tiny import build_tiny_llava

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = build_tiny_llava(Path(tmp) / "random", image_size=64, patch_size=8, llm_hidden=args.hidden,
                                  llm_layers=args.layers)
        for task in args.tasks:
            rng = np.random.default_rng(0)
            n = args.train + args.held_out
            records = {"one_square": lambda: squares(n, 1, False, rng),
                       "squares_presence": lambda: squares(n, 3, True, rng),
                       "scene_presence": lambda: scene_presence(n, rng)}[task]()
            train, held_out = records[:args.train], records[args.train:]
            answers = [r.answer for r in held_out]
            majority = max(answers.count(a) for a in set(answers)) / len(answers)
            t = time.time()
            s = train_vlm(source, Path(tmp) / task, train, held_out, steps=args.steps, lr=args.lr, log=lambda m: None)
            after = s["after"]
            results[task] = {"exact": after["exact"], "majority_baseline": majority,
                             "reliance_gap": after["reliance_gap"], "held_out_loss": after["loss"],
                             "seconds": round(time.time() - t, 1)}
            print(f"{task:18s} exact {after['exact']:.1%} (majority {majority:.1%}), reliance gap "
                  f"{after['reliance_gap']:+.3f}, {results[task]['seconds']:.0f} s", flush=True)
    meta = {"steps": args.steps, "train": args.train, "held_out": args.held_out, "llm": f"{args.hidden}x{args.layers}",
            "lr": args.lr, "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": platform.platform(),
            "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
