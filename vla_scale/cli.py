"""`vla-scale`: one command, several subcommands.

User errors (bad config, missing checkpoint, malformed input) print one line
and exit with status 2; they never show a traceback. Bugs still do.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from vla_scale.errors import VLAScaleError

log = logging.getLogger("vla_scale")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def cmd_train(args: argparse.Namespace) -> int:
    from vla_scale.config import load_config
    from vla_scale.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    result = Trainer(cfg).fit(resume=args.resume)
    last = max(result.losses) if result.losses else None
    print(json.dumps({"run_dir": str(result.run_dir), "checkpoint": str(result.last_checkpoint),
                      "final_loss": result.losses.get(last) if last else None}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vla_scale.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
    print(f"exported to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from vla_scale.errors import DataError
    from vla_scale.policy import VLAPolicy

    try:
        image = np.asarray(Image.open(args.image).convert("RGB"))
    except (OSError, ValueError) as e:
        raise DataError(f"--image {args.image}: cannot read the image: {e}") from None
    policy = VLAPolicy.from_pretrained(args.export, device=args.device)
    action = policy.predict_action(image, args.instruction)
    print(json.dumps({"action": action.tolist(), "forward_passes": policy.last_decode.forward_passes}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vla_scale.demo import run_demo

    run_demo(Path(args.workdir), steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vla-scale",
        description="Train vision-language-action models from pretrained VLMs without losing what they knew "
                    "(partially frozen dual encoders, string actions, co-training).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a VLA from a YAML config",
                       description="Train a VLA. CONFIG is a YAML preset (e.g. configs/tiny.yaml); any key can be "
                                   "overridden with dotted KEY=VALUE arguments, e.g. train.lr=3e-4 "
                                   "model.encoders.1.trainable=false. The resolved config is saved in the run folder.")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    t.add_argument("--resume", default="auto",
                   help="'auto' (latest complete checkpoint of the run, if any; default), 'none', or a checkpoint path")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write an inference folder from a checkpoint",
                       description="Consolidate a checkpoint (or a run folder's latest checkpoint) into a "
                                   "Hugging Face-style folder: safetensors, config, tokenizer, action statistics.")
    e.add_argument("checkpoint", help="checkpoint folder (runs/x/checkpoints/step_00000040) or run folder")
    e.add_argument("out", help="output folder (must not exist unless --force)")
    e.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    e.add_argument("--force", action="store_true", help="replace an existing export (atomically)")
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="predict one action from an image and an instruction",
                        description="Load an export folder and print the unnormalised action as JSON.")
    pr.add_argument("export", help="export folder written by `vla-scale export`")
    pr.add_argument("--image", required=True, help="an RGB image file")
    pr.add_argument("--instruction", required=True, help='e.g. "pick up the red block"')
    pr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    pr.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="the whole loop on a tiny model, on a CPU, in under a minute",
                       description="Build a tiny LLaVA-style source VLM locally, turn it into a siamese "
                                   "dual-encoder VLA, co-train it on the built-in synthetic set, stop half-way "
                                   "(as if preempted), resume, export, and predict an action.")
    d.add_argument("--workdir", default="demo_out", help="where everything is written (default: ./demo_out)")
    d.add_argument("--steps", type=int, default=400, help="training steps (default: 400, about 30 s on 2 cores)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except VLAScaleError as e:
        print(f"vla-scale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vla-scale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
