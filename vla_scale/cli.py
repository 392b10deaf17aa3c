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
    trainer = Trainer(cfg)
    result = trainer.fit(resume=args.resume)
    if trainer.strategy.is_main:  # one summary line per run, not per rank
        last = max(result.losses) if result.losses else None
        print(json.dumps({"run_dir": str(result.run_dir), "checkpoint": str(result.last_checkpoint),
                          "final_loss": result.losses.get(last) if last else None}))
    trainer.strategy.close()
    from vla_scale.train.distributed import shutdown

    shutdown()
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from vla_scale.config import load_config
    from vla_scale.train.distributed import shutdown
    from vla_scale.train.profiling import run_profile

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.run.output_dir) / "profile"
    summary = run_profile(cfg, args.steps, out, wait=args.wait, warmup=args.warmup, active=args.active)
    if summary is not None:  # rank 0
        print(f"written to {out}: summary.json, summary.txt, breakdown.png, {', '.join(summary['traces'])}")
    shutdown()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vla_scale.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, force=args.force, source=args.source)
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
    policy = VLAPolicy.from_pretrained(args.export, device=args.device, unnorm_key=args.unnorm_key)
    action = policy.predict_action(image, args.instruction)
    print(json.dumps({"action": action.tolist(), "forward_passes": policy.last_decode.forward_passes}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vla_scale.demo import run_demo

    run_demo(Path(args.workdir), budget="full" if args.full else args.budget, steps=args.steps)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vla_scale.eval.evaluate import evaluate
    from vla_scale.eval.runner import backend_class, remote_policy_name

    if args.list_suites:
        cls = backend_class(args.backend)
        for suite, variants in cls.suites().items():
            print(f"{suite}: variants {', '.join(variants)}; tasks {', '.join(cls.tasks(suite))}")
        return 0
    out = args.out
    if out is None:
        name = "expert" if args.policy == "expert" else "random" if args.policy == "random" \
            else remote_policy_name(args.policy) if args.policy.startswith(("ws://", "wss://")) \
            else Path(args.policy).resolve().name
        out = Path("eval_out") / f"{name}-{args.backend}-{args.suite}"
    backend_kwargs = {}
    if args.image_size is not None:
        backend_kwargs["image_size"] = args.image_size
    if args.cameras is not None:
        backend_kwargs["cameras"] = tuple(_csv(args.cameras) or ())
    report = evaluate(policy=args.policy, backend=args.backend, suite=args.suite, tasks=_csv(args.task),
                      episodes=args.episodes, envs=args.envs, seed=args.seed, out=out, gifs=args.gifs,
                      execute=args.execute, backend_kwargs=backend_kwargs, device=args.device, camera=args.camera,
                      progress=not args.no_progress, overwrite=args.overwrite, max_steps=args.max_steps)
    o = report["summary"]["overall"]
    lo, hi = o["ci95"]
    print(f"success {100 * o['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({o['successes']}/{o['n']}), "
          f"variant mean {100 * o['variant_mean']:.1f}%")
    print(f"report: {Path(report['path']) / 'report.md'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import sys

    from vla_scale.errors import ConfigError
    from vla_scale.policy import VLAPolicy
    from vla_scale.policy.server import TOKEN_ENV, PolicyServer, ServeLimits, is_loopback

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and token is None:
        print(f"warning: serving on {args.host} without a token: anyone who can reach this port can use the "
              f"policy (pass --token or set {TOKEN_ENV})", file=sys.stderr)
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {args.max_batch}")
    policy = VLAPolicy.from_pretrained(args.export, device=args.device, unnorm_key=args.unnorm_key)
    limits = ServeLimits(max_message_bytes=args.max_message_mb << 20)
    server = PolicyServer(policy, host=args.host, port=args.port, token=token, max_batch=args.max_batch,
                          batch_wait_ms=args.batch_wait_ms, limits=limits, name=Path(args.export).resolve().name)

    def ready(s: PolicyServer) -> None:
        print(f"serving {args.export} on {s.url} (device {policy.device}, max batch {s.max_batch}"
              f"{', token required' if token else ''}); Ctrl-C stops", flush=True)

    try:
        server.serve_forever(on_ready=ready)
    except OSError as err:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {err}") from None
    print("stopped", flush=True)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import contextlib

    from vla_scale.config import load_config
    from vla_scale.config.presets import resolve_config
    from vla_scale.train.plan import plan_memory

    config_path = resolve_config(args.config)  # a preset name becomes the installed file (arch JSONs beside it)
    cfg = load_config(config_path, args.overrides)
    # Libraries log to stdout when imported (DeepSpeed does); keep stdout for the plan itself.
    with contextlib.redirect_stdout(sys.stderr):
        plan = plan_memory(cfg, args.gpus, args.nodes, gpu_memory_gib=args.gpu_memory,
                           text_tokens=args.text_tokens, config_path=config_path)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format_table())
    if plan.batch_error is not None:
        # The memory plan is still worth reading; the exit status says the run would not start.
        print(f"vla-scale plan: error: {plan.batch_error}", file=sys.stderr)
        return 2
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from vla_scale.launch import submit

    result = submit(args.config, args.overrides, dry_run=args.dry_run, nodes=args.nodes,
                    gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node, time=args.time,
                    partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                    mem=args.mem, cpus_per_task=args.cpus_per_task, signal_lead_s=args.signal_lead,
                    chain=args.chain, max_restarts=args.max_restarts, job_name=args.job_name)
    if args.dry_run:
        print(result.text, end="")
        print(f"# dry run: nothing written or submitted (the script would go to {result.script})", file=sys.stderr)
    else:
        print(json.dumps({"script": str(result.script), "job_ids": result.job_ids}))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _csv(text: str | None) -> list[str] | None:
    """'a,b' -> ['a', 'b']; None -> None (use the default); 'none' or '' -> [] (explicitly nothing)."""
    if text is None:
        return None
    return [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]


def cmd_convert(args: argparse.Namespace) -> int:
    from vla_scale.data.converters import CONVERTERS
    from vla_scale.errors import DataError

    applies = {"images": ("llava",), "task": ("llava",), "max_tokens": ("llava",), "tokenizer": ("llava",),
               "camera": ("lerobot", "hdf5"),
               "wrist_camera": ("lerobot", "hdf5"), "state_keys": ("lerobot", "hdf5"), "action_key": ("lerobot",),
               "flip_images": ("hdf5",), "instruction": ("hdf5",), "extra_camera": ("lerobot", "hdf5"),
               "filter_key": ("hdf5",), "instruction_from_filename": ("hdf5",), "rlds_config": ("rlds",),
               "split": ("rlds",)}
    for option, kinds in applies.items():
        if getattr(args, option) not in (None, False) and args.kind not in kinds:
            raise DataError(f"--{option.replace('_', '-')} applies to {' and '.join(kinds)} only, not {args.kind}")
    from vla_scale.data.camera_images import ImageCodec

    options = dict(skip_bad=args.skip_bad, overwrite=args.overwrite, dataset_name=args.dataset_name,
                   size_limit=args.size_limit, compression=args.compression, progress=not args.no_progress,
                   codec=ImageCodec(args.image_format, args.image_quality))
    state_keys = _csv(args.state_keys)
    cameras = {}
    for item in args.extra_camera or []:  # NAME=KEY, issue 14's named cameras
        name, sep, key = item.partition("=")
        if not sep or not name.strip() or not key.strip():
            raise DataError(f"--extra-camera takes NAME=KEY (e.g. left_wrist=observation.images.cam_left_wrist), "
                            f"got {item!r}")
        cameras[name.strip()] = key.strip()
    if args.kind == "llava":
        if args.task is None:
            raise DataError("convert llava needs --task vqa, spatial or affordance")
        options.update(task=args.task, images=args.images, max_tokens=args.max_tokens, tokenizer=args.tokenizer)
    elif args.kind == "lerobot":
        if state_keys is not None and len(state_keys) > 1:
            raise DataError(f"--state-keys: a LeRobot dataset has one state feature; got {state_keys}")
        options.update(camera=args.camera, wrist_camera=args.wrist_camera, action_key=args.action_key or "action",
                       cameras=cameras)
        if state_keys is not None:
            options["state_key"] = state_keys[0] if state_keys else None
    elif args.kind == "rlds":
        options.update(rlds_config=args.rlds_config, split=args.split or "train")
    else:
        options.update(camera=args.camera, wrist_camera=args.wrist_camera, state_keys=state_keys,
                       flip_images=args.flip_images, instruction=args.instruction, cameras=cameras,
                       filter_key=args.filter_key, instruction_from_filename=args.instruction_from_filename)
    summary = CONVERTERS[args.kind](args.src, args.out, **options)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from vla_scale.data.stats import stats_for_shards
    from vla_scale.errors import DataError

    if args.out is not None and len(args.shards) > 1:
        raise DataError("--out names one file; with several shard folders each gets its own stats.json")
    keep = _csv(args.keep_dims)
    try:
        keep_dims = None if keep is None else [int(k) for k in keep]
    except ValueError:
        raise DataError(f"--keep-dims takes comma-separated dimension numbers (e.g. 6 or 5,6) or 'none', "
                        f"got {args.keep_dims!r}") from None
    report = {}
    for folder in args.shards:
        stats, path = stats_for_shards(folder, out=args.out, keep_dims=keep_dims, progress=not args.no_progress,
                                       outlier_factor=args.outlier_factor)
        report[str(path)] = {k: stats[k] for k in ("samples", "count", "dim", "mask", "q01", "q99", "min", "max",
                                                   "outliers")}
        outliers = stats["outliers"]
        if outliers["count"]:
            print(f"WARNING: {folder}: {outliers['count']} robot sample(s) with non-finite or absurd actions were left "
                  f"out of the statistics (listed under 'outliers' in {path}); the first: "
                  + "; ".join(f"episode {o['episode']} step {o['step']} ({o['where']}): {o['reason']}"
                              for o in outliers["examples"][:3]), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    config_help = ("YAML config file, or the name of a preset shipped with vla-scale (e.g. openvla_plus_7b, "
                   "pi0_plus_3b, tiny: the files in the repository's configs/)")
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
                                   "model.encoders.1.trainable=false. The resolved config is saved in the run folder. "
                                   "Several ranks (train.strategy=deepspeed, ZeRO-3): launch with "
                                   "`torchrun --nproc-per-node N -m vla_scale.cli train CONFIG ...` (NCCL on GPU, "
                                   "gloo on CPU); without a launcher it runs as a world of one.")
    t.add_argument("config", help=config_help)
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    t.add_argument("--resume", default="auto",
                   help="'auto' (latest complete checkpoint of the run, if any; default), 'none', or a checkpoint path")
    t.set_defaults(func=cmd_train)

    pf = sub.add_parser("profile", help="a short training job that shows throughput, MFU and where a step's time goes",
                        description="Train CONFIG for --steps steps in a scratch run (OUT/run) with every step "
                                    "logged and the GPU synchronized around each timed phase, then write to OUT: "
                                    "summary.json/.txt (samples/s, tokens/s in total and per device, MFU, the "
                                    "step-time breakdown: data, forward, backward, optimizer, checkpoint, comm; "
                                    "peak memory), trace_rank<R>.json (a Chrome trace of a few steps from "
                                    "torch.profiler) and breakdown.png. Any strategy; several ranks with "
                                    "`torchrun --nproc-per-node N -m vla_scale.cli profile CONFIG "
                                    "train.strategy=deepspeed ...`. MFU needs the device's peak: known GPUs are in a "
                                    "table, otherwise pass train.peak_flops=FLOP/s.")
    pf.add_argument("config", help="YAML config file")
    pf.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    pf.add_argument("--steps", type=_positive_int, default=10, help="steps to run (default: 10)")
    pf.add_argument("--out", default=None, help="output folder (default: RUN_OUTPUT_DIR/profile)")
    pf.add_argument("--wait", type=int, default=1, help="trace schedule: steps skipped first (default: 1)")
    pf.add_argument("--warmup", type=int, default=1, help="trace schedule: steps profiled, not kept (default: 1)")
    pf.add_argument("--active", type=_positive_int, default=2, help="trace schedule: steps recorded (default: 2)")
    pf.set_defaults(func=cmd_profile)

    e = sub.add_parser("export", help="write an inference folder from a checkpoint",
                       description="Consolidate a checkpoint (or a run folder's latest checkpoint) into a "
                                   "Hugging Face-style folder: safetensors, config, tokenizer, action statistics.")
    e.add_argument("checkpoint", help="checkpoint folder (runs/x/checkpoints/step_00000040) or run folder")
    e.add_argument("out", help="output folder (must not exist unless --force)")
    e.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    e.add_argument("--force", action="store_true", help="replace an existing export (atomically)")
    e.add_argument("--source", default=None, metavar="DIR",
                   help="the source VLM folder, when it has moved since training (the frozen encoders are read "
                        "from it and verified by content hash)")
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="predict one action from an image and an instruction",
                        description="Load an export folder and print the unnormalised action as JSON.")
    pr.add_argument("export", help="export folder written by `vla-scale export`")
    pr.add_argument("--image", required=True, help="an RGB image file")
    pr.add_argument("--instruction", required=True, help='e.g. "pick up the red block"')
    pr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    pr.add_argument("--unnorm-key", default=None,
                    help="whose action statistics to unnormalise with, when trained on several robot datasets")
    pr.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="the paper's whole loop on a tiny model in the built-in MuJoCo tabletop, on a CPU",
                       description="Scripted experts write demonstrations and scene questions; a tiny random LLaVA "
                                   "is trained as a VLM on the questions and saved; it becomes a dual-encoder VLA "
                                   "(frozen + trained encoder, string actions) co-trained on the paper's mix, stopped "
                                   "half-way as if preempted, resumed, exported, and evaluated in simulation "
                                   "(in_distribution, visual, language) beside the random policy and the experts. "
                                   "Data and the VLM stage are cached in --workdir.")
    d.add_argument("--workdir", default="demo_out", help="where everything is written (default: ./demo_out)")
    d.add_argument("--budget", default="default", help="named budget: default (a few minutes) or full")
    d.add_argument("--full", action="store_true", help="the longer budget ('full'; see the README for its time)")
    d.add_argument("--steps", type=int, default=None, help="VLA training steps (default: the budget's)")
    d.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="evaluate a policy in simulation: success with intervals, a report, GIFs",
                        description="Run a policy on a simulator suite: for each perturbation variant of the suite and "
                                    "each task, EPISODES seeded episodes, on ENVS parallel environment processes with "
                                    "one batched policy call per step (action chunks run open-loop). Writes "
                                    "report.json, report.md, success.png (Wilson 95%% intervals) and GIFs to --out. "
                                    "Backends: mujoco (built in), libero (pip install .[libero]), isaacgym "
                                    "(needs NVIDIA's Isaac Gym; never run on our machines).")
    ev.add_argument("--policy", required=True, metavar="EXPORT_DIR|ws://HOST:PORT|expert|random",
                    help="an export folder (`vla-scale export`), a policy server (`vla-scale serve`; its token, if "
                         "any, from $VLA_SCALE_SERVE_TOKEN), 'expert' (scripted, privileged) or 'random'")
    ev.add_argument("--backend", default="mujoco", choices=("mujoco", "libero", "isaacgym"))
    ev.add_argument("--suite", default="in_distribution",
                    help="mujoco: in_distribution, visual (or one of its variants), novel_objects, language; "
                         "libero: libero_spatial, libero_object, libero_goal, libero_10 and the LIBERO-PRO suites "
                         "(--list-suites shows them)")
    ev.add_argument("--task", default=None, help="comma-separated task names (default: all of the suite's)")
    ev.add_argument("--episodes", type=_positive_int, default=10, help="episodes per task and variant (default 10)")
    ev.add_argument("--envs", type=_positive_int, default=1, help="parallel environment processes (default 1)")
    ev.add_argument("--seed", type=int, default=0, help="first episode seed (default 0)")
    ev.add_argument("--out", default=None, help="report folder (default eval_out/POLICY-BACKEND-SUITE)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    ev.add_argument("--gifs", type=int, default=1, help="rollouts recorded as GIFs per task and variant (default 1)")
    ev.add_argument("--execute", type=_positive_int, default=None,
                    help="steps of an action chunk run before replanning (default: the whole chunk)")
    ev.add_argument("--max-steps", type=_positive_int, default=None,
                    help="cap every episode's steps (smoke tests; not comparable with a full evaluation)")
    ev.add_argument("--image-size", type=int, default=None, help="rendered image size (backend default otherwise)")
    ev.add_argument("--cameras", default=None, help="comma-separated cameras to render (backend default otherwise)")
    ev.add_argument("--camera", default=None, help="the camera the model sees (default: the first rendered)")
    ev.add_argument("--device", default=None, help="policy device: cpu or cuda (default: cuda when available)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--list-suites", action="store_true", help="list the backend's suites and tasks, then exit")
    ev.set_defaults(func=cmd_eval)

    sv = sub.add_parser("serve", help="serve an export's predict_action(s) over websockets, batching clients",
                        description="Serve an export folder to robots and simulators: websockets + msgpack with numpy "
                                    "arrays (openpi's convention). Concurrent requests from all clients are decoded "
                                    "together in one batched decode. Call it with vla_scale.policy.RemotePolicy(URL) "
                                    "or `vla-scale eval --policy ws://HOST:PORT`.")
    sv.add_argument("export", help="export folder written by `vla-scale export`")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    sv.add_argument("--token", default=None,
                    help="shared token clients must send (default: $VLA_SCALE_SERVE_TOKEN; none: no check)")
    sv.add_argument("--max-batch", type=int, default=32, help="most observations in one batched decode (default 32)")
    sv.add_argument("--batch-wait-ms", type=float, default=0.0,
                    help="wait this long for more requests to fill a batch (default 0: batch what is queued)")
    sv.add_argument("--max-message-mb", type=int, default=64,
                    help="largest request in MiB; a larger one closes its connection (default 64)")
    sv.add_argument("--unnorm-key", default=None,
                    help="whose action statistics to unnormalise with, when trained on several robot datasets")
    sv.set_defaults(func=cmd_serve)

    pl = sub.add_parser("plan", help="per-GPU memory of a config under ZeRO-3, without weights",
                        description="Build the config's model on the meta device (no weights, no memory; the "
                                    "weights folders' config.json, or the architecture JSONs named by "
                                    "model.llm_arch / model.encoders.N.arch when the folders do not exist yet), "
                                    "count its parameters per component, and print per-rank memory under "
                                    "DeepSpeed ZeRO-3: bf16 parameters, fp32 master weights, Adam moments, "
                                    "gradients, the replicated frozen encoders, ZeRO-3 buffers and activations "
                                    "for the micro-batch, with and without activation checkpointing, cross-checked "
                                    "against DeepSpeed's own estimator. Overrides come before the options, e.g. "
                                    "vla-scale plan configs/openvla_plus_7b.yaml train.micro_batch_size=16 --gpus 8")
    pl.add_argument("config", help=config_help)
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted overrides, e.g. train.micro_batch_size=16")
    pl.add_argument("--gpus", type=_positive_int, default=1, help="GPUs per node (default: 1)")
    pl.add_argument("--nodes", type=_positive_int, default=1, help="nodes (default: 1); world = gpus x nodes")
    pl.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                    help="memory of one GPU in GiB (default: 80, H100/A100-80G)")
    pl.add_argument("--text-tokens", type=_positive_int, default=None, metavar="N",
                    help="text tokens per sample (default: data.max_length, the longest allowed)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (bytes per rank) instead of a table")
    pl.set_defaults(func=cmd_plan)

    la = sub.add_parser("launch", help="submit a training run to a cluster scheduler (SLURM)",
                        description="Submit a training run to a cluster scheduler.")
    la_sub = la.add_subparsers(dest="scheduler", required=True, metavar="SCHEDULER")
    ls = la_sub.add_parser("slurm", help="render an sbatch script into the run folder and submit it",
                           description="Check the config against the allocation (ranks, batch split), write "
                                       "RUN/slurm/job.sbatch (readable; edit it and `sbatch` it again by hand) and "
                                       "RUN/slurm/config.yaml, and submit it. The job runs one torchrun agent per "
                                       "node (c10d rendezvous on the first node); SIGUSR1 before the time limit "
                                       "makes every rank finish its step, checkpoint and requeue the job, which "
                                       "resumes from that checkpoint. --chain K submits K jobs, each continuing "
                                       "the run after the previous one (afterany). Overrides come before the "
                                       "options, e.g. vla-scale launch slurm configs/openvla_plus_7b.yaml "
                                       "train.steps=100000 --nodes 8 --gpus-per-node 8 --time 24:00:00")
    ls.add_argument("config", help="YAML config file")
    ls.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    ls.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    ls.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one rank each (default 8)")
    ls.add_argument("--procs-per-node", type=int, default=None,
                    help="ranks per node on a cluster without GPUs (with --gpus-per-node 0)")
    ls.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS (default 24:00:00)")
    ls.add_argument("--partition", default=None)
    ls.add_argument("--account", default=None)
    ls.add_argument("--qos", default=None)
    ls.add_argument("--constraint", default=None)
    ls.add_argument("--mem", default=None, help="memory per node, e.g. 500G (default: the partition's)")
    ls.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node for its agent and ranks")
    ls.add_argument("--signal-lead", type=int, default=300, metavar="SECONDS",
                    help="send SIGUSR1 this long before the time limit (default 300; SLURM may send it up to "
                         "60 s earlier)")
    ls.add_argument("--chain", type=int, default=1, metavar="K", help="submit K jobs that continue one another")
    ls.add_argument("--max-restarts", type=int, default=3,
                    help="torchrun's elastic restarts within one job after a rank fails (default 3)")
    ls.add_argument("--job-name", default=None, help="default: run.name")
    ls.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    ls.set_defaults(func=cmd_launch)

    cv = sub.add_parser("convert", help="convert a dataset (LeRobot, HDF5, LLaVA JSON) to co-training shards",
                        description="Convert KIND at SRC to MDS shards in OUT (readable by plain "
                                    "streaming.StreamingDataset). lerobot: a LeRobotDataset folder (v2.x or v3.0, "
                                    "images in parquet or mp4); hdf5: a robomimic/LIBERO file or folder of files; "
                                    "llava: a LLaVA-style JSON/JSONL file plus --images DIR and --task. Streams with "
                                    "bounded memory, validates (NaN/inf actions, missing images, mismatched lengths "
                                    "are errors naming file, episode and step), and writes atomically: OUT appears "
                                    "only when complete. Prints a JSON summary. Then run `vla-scale stats OUT` for "
                                    "robot data.")
    cv.add_argument("kind", choices=("lerobot", "hdf5", "llava", "rlds"), help="source format (rlds needs the "
                                                                               "extra vla-scale[rlds])")
    cv.add_argument("src", help="source folder or file")
    cv.add_argument("out", help="output shard folder, or a URL on object storage (s3://bucket/path, gs://, hf://, "
                                "azure://...: staged locally shard by shard, index.json uploaded last); refused if "
                                "it already holds a dataset, unless --overwrite")
    cv.add_argument("--skip-bad", action="store_true",
                    help="skip bad episodes (robot: the whole episode) or samples (llava) and count them in the "
                         "summary, instead of stopping at the first")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing OUT (swapped in atomically when done)")
    cv.add_argument("--dataset-name", default=None, help="the 'dataset' column (default: the source's name)")
    cv.add_argument("--images", default=None, metavar="DIR", help="llava: image folder (default: the JSON's folder)")
    cv.add_argument("--task", choices=("vqa", "spatial", "affordance"), default=None, help="llava: co-training task")
    cv.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                    help="llava: count the records whose training text (prompt, turns, EOS) is longer than N tokens "
                         "(e.g. data.max_length), reported under max_tokens in the summary; needs --tokenizer")
    cv.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="llava: the model folder whose tokenizer --max-tokens counts with")
    cv.add_argument("--camera", default=None,
                    help="primary camera: lerobot feature (default: the first image/video feature) or hdf5 obs key "
                         "(default: agentview_rgb / agentview_image / the first image obs)")
    cv.add_argument("--wrist-camera", default=None,
                    help="optional wrist camera (e.g. observation.images.wrist, eye_in_hand_rgb)")
    cv.add_argument("--state-keys", default=None, metavar="K1,K2",
                    help="proprioception: lerobot one feature (default observation.state), hdf5 obs keys "
                         "concatenated (default LIBERO ee_states,gripper_states or robomimic eef/gripper keys); "
                         "'none' for no state")
    cv.add_argument("--action-key", default=None, help="lerobot: the action feature (default: action)")
    cv.add_argument("--flip-images", action="store_const", const=True, default=None,
                    help="hdf5: rotate frames 180 degrees (default: when the file says macros_image_convention="
                         "'opengl', as LIBERO's do)")
    cv.add_argument("--no-flip-images", dest="flip_images", action="store_const", const=False,
                    help="hdf5: never rotate frames, whatever the file says")
    cv.add_argument("--instruction", default=None, help="hdf5: instruction for every episode (overrides attributes)")
    cv.add_argument("--instruction-from-filename", action="store_true",
                    help="hdf5: when a file holds no instruction, take it from the file name (LIBERO names files "
                         "after their task); without it such a file is an error")
    cv.add_argument("--filter-key", default=None, metavar="KEY",
                    help="hdf5: convert only the demos listed in the file's mask/KEY (robomimic: train, valid, ...)")
    cv.add_argument("--rlds-config", default=None, metavar="NAME",
                    help="rlds: the dataset's standardisation (rlds, fractal20220817_data, bridge_dataset; default: "
                         "the dataset's name when listed, else rlds)")
    cv.add_argument("--split", default=None, help="rlds: the TFDS split to convert (default: train)")
    cv.add_argument("--extra-camera", action="append", default=None, metavar="NAME=KEY",
                    help="lerobot/hdf5: one more camera, stored as camera NAME (data.cameras) from feature or obs "
                         "KEY; repeat for several")
    cv.add_argument("--size-limit", default="64mb", help="shard size before starting a new shard (default: 64mb)")
    cv.add_argument("--compression", default=None, help="shard compression, e.g. zstd or zstd:7 (default: none)")
    cv.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg",
                    help="how every camera is stored (default jpeg); source frames already in JPEG are kept byte for "
                         "byte either way, and PNG ones under png")
    cv.add_argument("--image-quality", type=int, default=95, metavar="Q", help="JPEG quality 1-100 (default 95)")
    cv.add_argument("--no-progress", action="store_true", help="no progress bar")
    cv.set_defaults(func=cmd_convert)

    st = sub.add_parser("stats", help="action statistics of robot shards, into stats.json beside them",
                        description="One streaming pass over the robot samples of each SHARDS folder: per-dimension "
                                    "q01, q99 (within 1e-4 of the range of numpy's exact quantiles), mean, std, min, "
                                    "max, count, and the normalisation mask (dimensions only ever 0 or 1, such as a "
                                    "gripper, are kept raw unless --keep-dims says otherwise). Written atomically to "
                                    "SHARDS/stats.json, which the action normalizer reads.")
    st.add_argument("shards", nargs="+", help="shard folder(s) written by `vla-scale convert`, or their URLs "
                                              "(s3://...: stats.json is uploaded beside the shards); each gets its "
                                              "own file")
    st.add_argument("--out", default=None, help="write here instead of SHARDS/stats.json (one folder only)")
    st.add_argument("--keep-dims", default=None, metavar="DIMS",
                    help="comma-separated dimensions kept raw (mask false), e.g. 6; 'none' to normalise all "
                         "(default: detect {0,1}-valued dimensions)")
    st.add_argument("--outlier-factor", type=float, default=10.0, metavar="F",
                    help="actions beyond F robust ranges (q99 - q01) outside [q01, q99], and non-finite ones, are "
                         "left out and reported by episode and step (default 10)")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    st.set_defaults(func=cmd_stats)
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
