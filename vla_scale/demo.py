"""`vla-scale demo`: the whole loop on a tiny model, on a CPU, in under a minute.

Builds a tiny LLaVA-style source VLM (SigLIP tower + Llama, random init, BPE
tokenizer trained on the spot, saved with save_pretrained), turns it into the
paper's siamese dual-encoder VLA, co-trains it on the built-in synthetic set
written as MDS shards and streamed with exact per-batch mixing (robot 50%,
VQA 25%, spatial 12.5%, affordance 12.5%), stops half-way as if
preempted, resumes from the checkpoint, exports an inference folder and
predicts actions with grammar-constrained decoding. Held-out validation
(action error against the mean-action baseline and the vision-reliance gap)
runs at the preemption point and at the end. Everything it writes stays
under --workdir.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from vla_scale.config import load_config
from vla_scale.config.presets import preset_path
from vla_scale.errors import ConfigError

PRESET = "tiny"  # a shipped preset: found by name in a checkout and in an installed wheel alike


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _verdict(val: dict[str, float]) -> str:
    """What the held-out numbers say, without flattering them."""
    gap = val.get("val/reliance/robot/loss_gap", 0.0)
    l1, base = val.get("val/l1/robot", float("nan")), val.get("val/l1_baseline/robot", float("nan"))
    grip, majority = val.get("val/gripper_acc/robot", float("nan")), val.get("val/gripper_acc_baseline/robot", 0.0)
    parts = [f"held-out action error {l1:.3f} {'beats' if l1 < base else 'does not beat'} the mean-action "
             f"baseline {base:.3f}",
             f"gripper {grip:.0%} {'beats' if grip > majority else 'does not beat'} the majority {majority:.0%}",
             (f"swapping images raises the held-out loss by {gap:.3f}: the policy uses the image" if gap > 0.01 else
              "swapping images changes nothing: the policy ignores the image (train longer before trusting it)")]
    return "; ".join(parts)


def run_demo(workdir: Path, steps: int = 2000) -> dict:
    from vla_scale.data.synthetic import make_samples
    from vla_scale.models.tiny import build_tiny_llava
    from vla_scale.policy import VLAPolicy
    from vla_scale.train.export import export_checkpoint
    from vla_scale.train.metrics import read_metrics
    from vla_scale.train.trainer import Trainer
    from vla_scale.train.validation import format_validation

    if steps < 2:
        raise ConfigError(f"--steps must be at least 2 (the demo stops half-way and resumes), got {steps}")
    t0 = time.time()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "source_vlm"
    if not (source / "config.json").is_file():
        _say(f"building a tiny LLaVA-style source VLM (SigLIP + Llama, random init) in {source}")
        build_tiny_llava(source)
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's own folder: every demo starts from step 0
    half = steps // 2
    cfg = load_config(preset_path(PRESET), [f"model.source={source}", f"run.output_dir={run_dir}",
                                            f"train.steps={steps}", f"train.checkpoint_every={half}",
                                            f"train.warmup_steps={min(4, steps)}", f"train.val_every={half}"])
    enc = ", ".join(f"{e.name} ({'trained' if e.trainable else 'frozen'})" for e in cfg.model.encoders)
    _say(f"dual encoder: {enc}; mix: " + ", ".join(f"{s.name} {s.weight:g}" for s in cfg.data.sources))
    _say(f"synthetic co-training data is written as MDS shards under {run_dir / 'data'} and streamed from there; "
         f"held-out sets ({', '.join(v.name for v in cfg.data.val_sources)}) are validated every {half} steps")
    _say(f"training steps 1-{half}, then stopping as if the job were preempted")
    first = Trainer(cfg).fit(resume="none", stop_after=half)
    _say(f"checkpoint written: {first.last_checkpoint}")
    _say(f"resuming from the latest checkpoint to step {steps}")
    second = Trainer(cfg).fit(resume="auto")
    losses = {**first.losses, **second.losses}
    _say(f"loss: step 1 {losses[1]:.3f} -> step {steps} {losses[steps]:.3f}")
    export = export_checkpoint(run_dir, workdir / "export", force=True)
    _say(f"exported the inference folder: {export}")

    policy = VLAPolicy.from_pretrained(export, device="cpu")
    held_out = make_samples("robot", 3, seed=12345, image_size=cfg.data.synthetic.image_size,
                            action_dim=cfg.actions.dim)
    for s in held_out:
        a = policy.predict_action(s["image"], s["instruction"])
        _say(f"'{s['instruction']}' -> {np.array2string(a, precision=3, suppress_small=True)} "
             f"(target {np.array2string(s['action'], precision=3, suppress_small=True)})")
    d = policy.last_decode
    _say(f"decoding: {d.forward_passes} LLM forward passes for {len(d.ids)} action tokens (forced tokens skipped)")
    val = {k: v for k, v in read_metrics(run_dir / "metrics.jsonl")[-1].items() if k.startswith("val/")}
    _say(format_validation(steps, val))
    _say(_verdict(val) + f"; done in {time.time() - t0:.0f} s")
    return {"losses": losses, "export": str(export), "validation": val}
