"""The paper's ablation in miniature, on the built-in MuJoCo tabletop (a script, not a test).

    python benchmarks/ablation.py --out benchmarks/results/ablation [--budget default] [--seeds 0 1 2]
    python benchmarks/ablation.py --out /tmp/abl --budget smoke --seeds 0 --variants a_baseline d_full  # CI

Every variant trains with the same budget (data, VLM stage, steps, batch) and the same source VLM (the
demo's VLM stage, shared), for each seed, then is evaluated on in_distribution, each visual variant,
language (paraphrases) and novel_objects, with Wilson 95% intervals, and its encoders are probed:

- architecture (the paper's Table 4 order): (a) one trainable encoder, 256-bin action tokens, robot data
  only; (b) + a frozen copy of the encoder; (c) + string action tokens; (d) + co-training with VQA,
  spatial and affordance data (the full method);
- co-training (Table 5): robot only (= c), + VQA, + VQA + spatial, + affordance (= d);
- feature retention: a linear probe of object colour and shape on rendered crops
  (`vla_scale.demo.probe`) on the random tower, the source tower after its VLM stage (what the frozen copy
  keeps) and each variant's fine-tuned trainable encoder.

Writes OUT/ablation.json (everything), OUT/ablation.md (the tables) and OUT/ablation.png; each run's
training folder and evaluation reports stay under OUT/runs/. Runs already finished (their result.json
exists) are reused, so an interrupted ablation continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

ROBOT = (("robot", "robot", 1.0),)
VQA = ("vqa", "vqa", 0.25)
SPATIAL = ("spatial", "spatial", 0.125)
AFFORDANCE = ("affordance", "affordance", 0.125)
# name -> (label, frozen copy, action tokenizer, mix)
VARIANTS = {
    "a_baseline": ("(a) one encoder, bins, robot only", False, "bins", ROBOT),
    "b_dual": ("(b) + frozen copy", True, "bins", ROBOT),
    "c_string": ("(c) + string actions (robot only)", True, "string", ROBOT),
    "d_full": ("(d) + co-training: VQA, spatial, affordance (full method)", True, "string",
               (("robot", "robot", 0.5), VQA, SPATIAL, AFFORDANCE)),
    "cot_vqa": ("co-training: robot + VQA", True, "string", (("robot", "robot", 0.5), VQA)),
    "cot_vqa_spatial": ("co-training: robot + VQA + spatial", True, "string",
                        (("robot", "robot", 0.5), VQA, SPATIAL)),
}
ARCH_TABLE = ("a_baseline", "b_dual", "c_string", "d_full")
COTRAIN_TABLE = ("c_string", "cot_vqa", "cot_vqa_spatial", "d_full")
EVAL_SUITES = ("in_distribution", "visual", "language", "novel_objects")


def run_one(name: str, seed: int, b, work: Path, source: Path, data: Path, held_out: Path, probe_set) -> dict:
    from vla_scale.demo import evaluate_suites, vla_config
    from vla_scale.demo.probe import export_towers, probe_encoders
    from vla_scale.eval.runner import ModelPolicy
    from vla_scale.policy import VLAPolicy
    from vla_scale.train.export import export_checkpoint
    from vla_scale.train.metrics import read_metrics
    from vla_scale.train.trainer import Trainer

    out = work / "runs" / f"{name}-seed{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if out.exists():
        shutil.rmtree(out)
    label, frozen, tokenizer, mix = VARIANTS[name]
    t0 = time.time()
    cfg = vla_config(work, b, source, data, held_out, mix=mix, frozen=frozen, action_tokenizer=tokenizer,
                     run_dir=out / "run", seed=seed)
    Trainer(cfg).fit(resume="none")
    metrics = read_metrics(out / "run" / "metrics.jsonl")
    export = export_checkpoint(out / "run", out / "export", force=True)
    train_s = time.time() - t0
    policy = ModelPolicy(VLAPolicy.from_pretrained(export, device="cpu"), name=name)
    b_eval = replace(b, seed=seed, episodes_per_suite={**b.episodes_per_suite,
                                                       "novel_objects": b.episodes_per_suite["language"]})
    reports = evaluate_suites(policy, b_eval, out / "eval", name=name, suites=EVAL_SUITES, gifs=1)
    towers = {k: v for k, v in export_towers(str(export)).items() if k.endswith("train")}
    probe = probe_encoders(towers, probe_set)
    result = {"variant": name, "label": label, "seed": seed, "train_seconds": round(train_s, 1),
              "final_loss": metrics[-1].get("loss"),
              "validation": {k: v for k, v in metrics[-1].items() if k.startswith("val/")},
              "suites": {s: {"overall": r["summary"]["overall"], "variants": r["summary"]["variants"]}
                         for s, r in reports.items()},
              "probe_trained_encoder": next(iter(probe.values())) if probe else None,
              "seconds": round(time.time() - t0, 1)}
    done.write_text(json.dumps(result, indent=1))
    shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # keep the export, drop optimizer states
    return result


def pooled(results: list[dict], suite: str, variant: str | None = None) -> dict:
    """Successes pooled over seeds (Wilson interval on the pool) and the per-seed rates."""
    from vla_scale.eval.metrics import wilson

    cells = [r["suites"][suite]["variants"][variant] if variant else r["suites"][suite]["overall"] for r in results]
    k, n = sum(c["successes"] for c in cells), sum(c["n"] for c in cells)
    return {"successes": k, "n": n, "rate": k / n if n else 0.0, "ci95": list(wilson(k, n)),
            "per_seed": [c["rate"] for c in cells],
            "variant_mean": (sum(r["suites"][suite]["overall"]["variant_mean"] for r in results) / len(results))
            if variant is None else None}


def fmt(c: dict) -> str:
    return f"{100 * c['rate']:.0f}% [{100 * c['ci95'][0]:.0f}-{100 * c['ci95'][1]:.0f}]"


def tables(summary: dict, probe_base: dict, visual_variants: list[str]) -> str:
    lines = []
    for title, names in (("Architecture and action format (paper Table 4 order)", ARCH_TABLE),
                         ("Co-training data (paper Table 5 order)", COTRAIN_TABLE)):
        names = [n for n in names if n in summary]
        if not names:
            continue
        lines += [f"### {title}", "", "| variant | in-distribution | visual (mean of variants) | "
                  + " | ".join(visual_variants) + " | language | novel objects | probe colour / shape |",
                  "|---|---|---|" + "---|" * len(visual_variants) + "---|---|---|"]
        for n in names:
            s = summary[n]
            p = s["probe"]
            lines.append(f"| {s['label']} | {fmt(s['in_distribution'])} | {100 * s['visual']['variant_mean']:.0f}% | "
                         + " | ".join(fmt(s['visual_variants'][v]) for v in visual_variants)
                         + f" | {fmt(s['language'])} | {fmt(s['novel_objects'])} | "
                         + (f"{100 * p['colour']:.0f}% / {100 * p['shape']:.0f}%" if p else "-") + " |")
        lines.append("")
    lines += ["### Feature retention (linear probe on rendered crops, held-out scenes)", "",
              "| encoder | colour | shape |", "|---|---|---|"]
    for name, p in probe_base.items():
        lines.append(f"| {name} | {100 * p['colour']:.0f}% | {100 * p['shape']:.0f}% |")
    for n, s in summary.items():
        if s["probe"]:
            lines.append(f"| {s['label']}: trained encoder after fine-tuning | {100 * s['probe']['colour']:.0f}% | "
                         f"{100 * s['probe']['shape']:.0f}% |")
    return "\n".join(lines) + "\n"


def chart(summary: dict, path: Path) -> None:
    from vla_scale.demo.plots import success_by_suite

    rows = {s["label"].split(" ", 1)[0] if s["label"].startswith("(") else n: {
        suite: s[suite] for suite in EVAL_SUITES} for n, s in summary.items()}
    success_by_suite(rows, path, title="ablation: success by suite, pooled over seeds (Wilson 95%)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", default="default", help="a demo budget (vla_scale.demo.BUDGETS)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--probe-scenes", type=int, default=60)
    args = p.parse_args(argv)

    from vla_scale.demo import BUDGETS, prepare_data, prepare_source_vlm, vla_config
    from vla_scale.demo.probe import probe_encoders, render_probe_set, source_towers
    from vla_scale.eval.perturbations import VISUAL
    from vla_scale.models.tiny import build_tiny_llava

    b = BUDGETS[args.budget]
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data, held_out = prepare_data(work, b)
    source, vlm = prepare_source_vlm(work, b)
    probe_set = render_probe_set(args.probe_scenes, seed=777_000, image_size=b.render_size)
    random_init = work / "source_vlm_random_probe"
    if not (random_init / "config.json").exists():
        build_tiny_llava(random_init, image_size=b.image_size, patch_size=b.patch_size, seed=b.seed,
                         llm_hidden=b.llm_hidden, llm_layers=b.llm_layers)
    probe_base = {}
    for label, folder in (("random initialisation", random_init), ("source after its VLM stage (= frozen copy)",
                                                                     source)):
        cfg = vla_config(work, b, folder, data, held_out, frozen=False, run_dir=work / "probe_cfg")
        probe_base[label] = next(iter(probe_encoders(source_towers(cfg.model), probe_set).values()))
    results = {n: [run_one(n, s, b, work, source, data, held_out, probe_set) for s in args.seeds]
               for n in args.variants}
    summary = {}
    for n, rs in results.items():
        probes = [r["probe_trained_encoder"] for r in rs if r["probe_trained_encoder"]]
        summary[n] = {"label": VARIANTS[n][0], **{s: pooled(rs, s) for s in EVAL_SUITES},
                      "visual_variants": {v: pooled(rs, "visual", v) for v in VISUAL},
                      "probe": {k: sum(p[k] for p in probes) / len(probes) for k in ("colour", "shape")}
                      if probes else None}
    md = tables(summary, probe_base, list(VISUAL))
    meta = {"budget": args.budget, "seeds": args.seeds, "tasks": list(b.tasks), "machine": platform.platform(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "seconds": round(time.time() - t0, 1),
            "vlm_stage": {k: v for k, v in vlm.items() if k != "loss_curve"}}
    (work / "ablation.json").write_text(json.dumps({"meta": meta, "summary": summary, "probe_base": probe_base,
                                                     "runs": results}, indent=1))
    header = (f"Budget '{args.budget}' (tasks {', '.join(b.tasks)}), seeds {args.seeds}, {meta['date']}, "
              f"{meta['machine']} ({meta['cpus']} CPUs), {meta['seconds']:.0f} s. Success pooled over seeds with "
              f"Wilson 95% intervals.\n\n")
    (work / "ablation.md").write_text(header + md)
    chart(summary, work / "ablation.png")
    print(header + md)
    print(f"wrote {work / 'ablation.json'}, {work / 'ablation.md'}, {work / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
