"""Can the tiny source VLM learn to ground words in images? (The demo's bottleneck, BENCHMARKS.md 9b.)

    python benchmarks/vlm_grounding.py --out benchmarks/results/vlm_grounding.json [--steps 600] [--hidden 64]

Trains the demo's VLM stage (`vla_scale.demo.vlm_stage.train_vlm`, the product's own code) from the same
random tiny LLaVA on small tasks, each against its baseline in the same run (the majority answer of the
held-out set), and reports held-out exact answers and the image-reliance gap (loss with another
example's image minus the loss):

- `one_square`: one 10 px square on grey, "What colour is the block?" (no word to bind);
- `squares_presence`: three squares of distinct colours, "Is there a red block?" (binding a word of the
  question to one of several objects, as "pick up the red block" needs);
- `scene_presence`: the same question on freshly reset MuJoCo tabletop scenes;
- `one_square_brown`: `one_square` on the tabletop's brown (140, 102, 71) instead of grey;
- `scene_colour_brown`, `scene_colour_grey`: "What colour is the block?" on freshly reset one-cube scenes
  (`MujocoBackend(objects=1, pads=1)`) on the default brown table and on the demo's grey one (0.5);
- `scene_point_grey`: "Point to where to grasp the block." on the grey one-cube scenes, scored as the mean
  absolute error of the parsed point (x, y in [0, 1]) against always answering the mean point, per axis;
- `square_point`: "Point to the block." for one 10 px square on grey (the same score).

`--image-size` and `--patch` set the tower's input side and patch (the number of image tokens is
(image / patch)^2): localisation was measured to hinge on them (BENCHMARKS.md 9f).

`--seeds 0 1 2` repeats each task from other random initialisations and orders (the stage is noisy:
the same setting has reached 90% on one seed and chance on another).

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


GREY, BROWN = (140, 140, 140), (140, 102, 71)


def squares(n: int, k: int, presence: bool, rng: np.random.Generator, background=GREY, point: bool = False):
    from vla_scale.demo.vlm_stage import VLRecord

    out = []
    names = list(COLOURS)
    for _ in range(n):
        present = rng.choice(len(names), k, replace=False)
        img = np.empty((128, 128, 3), np.uint8)
        img[:] = background
        for c in present:
            x, y = rng.integers(0, 118, 2)
            img[y:y + 10, x:x + 10] = COLOURS[names[c]]
        if point:
            out.append(VLRecord(img, "Point to the block.", f"({(x + 5) / 128:.2f}, {(y + 5) / 128:.2f})",
                                "affordance"))
        elif presence:
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


def scene_questions(n: int, rng: np.random.Generator, table_rgb, point: bool = False):
    """One-cube scenes: the cube's colour, or where to grasp it (the projected centre of its top face)."""
    from vla_scale.demo.vlm_stage import VLRecord
    from vla_scale.eval.mujoco_backend import MujocoBackend
    from vla_scale.eval.scene_qa import project

    out = []
    with MujocoBackend(cameras=("primary",), image_size=128, objects=1, pads=1, table_rgb=table_rgb) as backend:
        for _ in range(n):
            obs = backend.reset("pick_place", int(rng.integers(2**31)))
            view = backend.scene()
            (name, centre), = view.objects.items()
            if point:
                u, v = project(backend, np.asarray([centre + [0.0, 0.0, view.object_half]]))[0]
                out.append(VLRecord(obs.images["primary"], "Point to where to grasp the block.",
                                    f"({u:.2f}, {v:.2f})", "affordance"))
            else:
                out.append(VLRecord(obs.images["primary"], "What colour is the block?", name, "vqa"))
    return out


def point_error(folder: Path, held_out) -> dict[str, float]:
    """Greedy answers of the saved stage to point questions: mean absolute error against the mean point."""
    import re

    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from vla_scale.demo.vlm_stage import _Batcher

    model = LlavaForConditionalGeneration.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    batcher = _Batcher(tok, model.config, int(pre["size"]["height"]), pre["image_mean"], pre["image_std"])
    num = re.compile(r"\(([-\d.]+), ([-\d.]+)\)")
    truth, pred = [], []
    for r in held_out:
        ids, labels = batcher.ids(r)
        prompt = torch.tensor([ids[:next(i for i, x in enumerate(labels) if x != -100)]])
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 pixel_values=batcher.pixels([r.image]), max_new_tokens=16, do_sample=False)
        m = num.search(tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
        t = num.search(r.answer)
        truth.append((float(t[1]), float(t[2])))
        pred.append((float(m[1]), float(m[2])) if m else (0.5, 0.5))  # unparsable: the image's centre
    truth, pred = np.asarray(truth), np.asarray(pred)
    err, base = np.abs(pred - truth).mean(0), np.abs(truth - truth.mean(0)).mean(0)
    return {"point_mae": float(err.mean()), "mean_point_mae": float(base.mean()),
            "point_mae_xy": [round(float(e), 4) for e in err], "mean_point_mae_xy": [round(float(b), 4) for b in base]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--held-out", type=int, default=200)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tasks", nargs="+", default=["one_square", "squares_presence", "scene_presence",
                                                  "one_square_brown", "scene_colour_brown", "scene_colour_grey",
                                                  "scene_point_grey"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    args = p.parse_args(argv)

    from vla_scale.demo.vlm_stage import train_vlm
    from vla_scale.models.tiny import build_tiny_llava

    grey = (0.5, 0.5, 0.5)
    makers = {"one_square": lambda n, rng: squares(n, 1, False, rng),
              "squares_presence": lambda n, rng: squares(n, 3, True, rng),
              "scene_presence": scene_presence,
              "one_square_brown": lambda n, rng: squares(n, 1, False, rng, BROWN),
              "scene_colour_brown": lambda n, rng: scene_questions(n, rng, None),
              "scene_colour_grey": lambda n, rng: scene_questions(n, rng, grey),
              "scene_point_grey": lambda n, rng: scene_questions(n, rng, grey, point=True),
              "square_point": lambda n, rng: squares(n, 1, False, rng, point=True)}
    unknown = sorted(set(args.tasks) - set(makers))
    if unknown:
        p.error(f"unknown task(s) {unknown}; tasks: {', '.join(makers)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            source = build_tiny_llava(Path(tmp) / f"random{seed}", image_size=args.image_size, patch_size=args.patch,
                                      llm_hidden=args.hidden,
                                      llm_layers=args.layers, seed=seed)
            for task in args.tasks:
                rng = np.random.default_rng(0)  # the same examples for every seed: only the model's draws differ
                records = makers[task](args.train + args.held_out, rng)
                train, held_out = records[:args.train], records[args.train:]
                answers = [r.answer for r in held_out]
                majority = max(answers.count(a) for a in set(answers)) / len(answers)
                t = time.time()
                folder = Path(tmp) / f"{task}-{seed}"
                s = train_vlm(source, folder, train, held_out, steps=args.steps, lr=args.lr, seed=seed,
                              log=lambda m: None)
                after = s["after"]
                row = {"exact": after["exact"], "majority_baseline": majority, "reliance_gap": after["reliance_gap"],
                       "held_out_loss": after["loss"], "seconds": round(time.time() - t, 1)}
                if task.endswith("_point") or task.startswith("scene_point"):
                    row.update(point_error(folder, held_out[:100]))
                results.setdefault(task, {})[str(seed)] = row
                extra = (f", point error x, y {row['point_mae_xy']} (mean point {row['mean_point_mae_xy']})"
                         if "point_mae" in row else "")
                print(f"{task:18s} seed {seed}: exact {after['exact']:.1%} (majority {majority:.1%}), reliance gap "
                      f"{after['reliance_gap']:+.3f}{extra}, {row['seconds']:.0f} s", flush=True)
    meta = {"steps": args.steps, "seeds": args.seeds, "train": args.train, "held_out": args.held_out, "llm": f"{args.hidden}x{args.layers}",
            "image_size": args.image_size, "patch": args.patch,
            "lr": args.lr, "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": platform.platform(),
            "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
