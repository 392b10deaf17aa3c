"""Training-step throughput: single-process strategy, DeepSpeed ZeRO-3 on 1 and N ranks, against a bare PyTorch loop.

    python benchmarks/train_step.py                       # CPU: tiny LLaVA, LLM 256 wide x 4 layers
    python benchmarks/train_step.py --llm-hidden 2048 --llm-layers 16 --global-batch 64 --micro-batch 16 \
        --image-size 224 --ranks 1 8 --peak-tflops 989    # GPU, ~1B parameters, bf16, NCCL, MFU

Every configuration trains the SAME model (a tiny LLaVA-family source VLM
built locally at the requested size, turned into the siamese dual-encoder VLA
by the framework) on the SAME batches (the framework's co-training loader,
same seed). Each runs in its own process (DeepSpeed under torchrun), so they
do not share threads, allocator state or a process group.

- bare PyTorch: the framework's model and batches, a hand-written loop:
               zero_grad, forward/backward per micro-batch, clip, AdamW step,
               LR step. No strategy, no trainer. The baseline.
- single:      `Trainer` with SingleProcessStrategy.
- bare DeepSpeed: the ZeRO-3 engine our strategy builds, driven by the
               textbook loop (forward, engine.backward, engine.step per
               micro-batch): what ZeRO-3 itself costs against bare PyTorch.
- deepspeed:   `Trainer` with DeepSpeedStrategy (ZeRO-3), on 1 and N ranks;
               its overhead is taken against the bare DeepSpeed loop.

Two times per step for the framework rows: `step` is `strategy.train_step`
alone (what the bare loop does: the overhead of the strategy), `loop` is the
whole trainer iteration (data loading from the streaming shards, metrics
log, progress), i.e. what a user waits for. Overhead = time / baseline's
step time - 1, on one device (the baselines are named above and in the JSON).
Medians over the steps after `--warmup`; each configuration runs
`--repeats` times (interleaved) and keeps its fastest median, since other
load on the machine only ever slows a run down.

tokens/s counts every input token (image tokens included), over all ranks.
MFU (GPU, with --peak-tflops or a known device): model FLOPs per step /
(step time x devices x peak); model FLOPs = 6 x trainable parameters x tokens
they process (LLM: `transformer_flops_per_token`, with attention) + 2 x frozen
encoder parameters x its patch tokens (forward only).

On GPU the model trains in bf16 (autocast for bare/single, DeepSpeed bf16 for
ZeRO-3) with NCCL; on CPU in fp32 over gloo, with the cores split evenly over
the ranks. Results are printed as a table and written as JSON
(benchmarks/results/train_step_<device>.json by default).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense


# --------------------------------------------------------------------------- workers (one configuration each)


def _config(args: argparse.Namespace, run_dir: Path, strategy: str):
    from vla_scale.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.source={args.source}", f"run.output_dir={run_dir}", f"model.image_size={args.image_size}",
        f"data.synthetic.image_size={args.image_size}", f"train.steps={args.steps}",
        f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}",
        "train.warmup_steps=1", "train.checkpoint_every=0", "train.progress=false", "train.tensorboard=false",
        f"train.strategy={strategy}", "train.log_every=1",
        # Partition everything, as for a large model (the default threshold would keep this one whole).
        "deepspeed.stage3_param_persistence_threshold=0",
    ])


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _model_flops_per_step(model, samples: int, tokens: int) -> float:
    from vla_scale.models.vla import param_numel
    from vla_scale.train.metrics import transformer_flops_per_token

    core = model.core
    llm_cfg = core.llm.config
    n_llm = sum(param_numel(p) for p in core.llm.parameters())  # ZeRO-3 partitions leave numel() == 0
    patches = model.num_image_tokens * samples
    seq = tokens / max(samples, 1)
    llm = tokens * transformer_flops_per_token(n_llm, llm_cfg.num_hidden_layers, llm_cfg.hidden_size, int(seq))
    trainable_vision = sum(param_numel(p) for n, p in core.named_parameters() if not n.startswith("llm."))
    return llm + 6.0 * trainable_vision * patches + 2.0 * model.frozen_parameter_count() * patches


def worker_framework(args: argparse.Namespace) -> None:
    """`Trainer.fit` with the given strategy; records per-step strategy and loop times."""
    import torch

    from vla_scale.train.trainer import Trainer

    out = Path(args.out)
    cfg = _config(args, out.parent / f"run_{args.mode}_{os.environ.get('WORLD_SIZE', '1')}", args.strategy)
    trainer = Trainer(cfg)
    strategy = trainer.strategy
    step_times, loop_marks, tokens, samples = [], [], [], []
    inner = strategy.train_step

    def timed_train_step(micro_batches):
        _sync(strategy.device)
        t0 = time.perf_counter()
        result = inner(micro_batches)
        _sync(strategy.device)
        step_times.append(time.perf_counter() - t0)
        loop_marks.append(time.perf_counter())
        tokens.append(result.tokens)
        samples.append(result.samples)
        return result

    strategy.train_step = timed_train_step  # instance attribute: the trainer calls it unchanged
    trainer.fit(resume="none")
    if strategy.is_main:
        flops = _model_flops_per_step(trainer.model, samples[-1], tokens[-1])
        json.dump({"step_s": step_times, "loop_s": [b - a for a, b in zip(loop_marks, loop_marks[1:])],
                   "tokens": tokens, "samples": samples, "model_flops_per_step": flops,
                   "world_size": strategy.world_size, "device": str(strategy.device),
                   "trainable_params": trainer.model.trainable_parameter_count(),
                   "frozen_params": trainer.model.frozen_parameter_count(),
                   "threads": torch.get_num_threads()}, open(out, "w"))
    strategy.close()
    from vla_scale.train.distributed import shutdown

    shutdown()


def _bare_deepspeed_steps(trainer, batches) -> list[float]:
    """The DeepSpeed engine our strategy built, driven by the textbook loop (no strategy, no trainer)."""
    engine, model, device = trainer.strategy.engine, trainer.model, trainer.strategy.device
    times = []
    for micro_batches in batches:
        _sync(device)
        t0 = time.perf_counter()
        for mb in micro_batches:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            feats = model.frozen(mb["pixel_values"])
            loss = engine(mb["pixel_values"], mb["input_ids"], mb["attention_mask"], mb["labels"], feats)[0]
            engine.backward(loss)
            engine.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def worker_bare(args: argparse.Namespace) -> None:
    """The framework's model and batches through a hand-written loop: plain PyTorch, or plain DeepSpeed."""
    import math

    import torch

    from vla_scale.train.schedule import build_scheduler
    from vla_scale.train.trainer import Trainer

    out = Path(args.out)
    cfg = _config(args, out.parent / f"run_bare_{args.strategy}", args.strategy)
    trainer = Trainer(cfg)
    trainer._build()  # the framework's construction of model and loader, so both sides see the same ones
    model, device = trainer.model, trainer.strategy.device
    batches = [trainer.loader.next_step() for _ in range(args.steps)]  # drawn up front: no data time
    model.core.train()  # as the strategies do (from_pretrained returns eval-mode modules)
    del trainer.loader  # its streaming iterator's threads would compete for the cores
    import gc

    gc.collect()
    samples = [sum(mb["input_ids"].shape[0] for mb in mbs) for mbs in batches]
    tokens = [sum(int(mb["attention_mask"].sum()) + mb["input_ids"].shape[0] * model.num_image_tokens
                  for mb in mbs) for mbs in batches]
    if args.strategy == "deepspeed":
        step_times = _bare_deepspeed_steps(trainer, batches)
        if trainer.strategy.is_main:
            json.dump({"step_s": step_times, "loop_s": step_times, "tokens": tokens, "samples": samples,
                       "model_flops_per_step": _model_flops_per_step(model, samples[-1], tokens[-1]),
                       "world_size": trainer.strategy.world_size, "device": str(device),
                       "trainable_params": model.trainable_parameter_count(),
                       "frozen_params": model.frozen_parameter_count(), "threads": torch.get_num_threads()},
                      open(out, "w"))
        return
    params = [p for p in model.core.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps,
                            weight_decay=cfg.train.weight_decay, foreach=True)
    sched = build_scheduler(opt, warmup_steps=1, total_steps=args.steps)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    step_times = []
    for micro_batches in batches:
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        n = len(micro_batches)
        for mb in micro_batches:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            if amp is not None:
                with amp:
                    loss = model(mb).loss
            else:
                loss = model(mb).loss
            (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or math.inf)
        opt.step()
        sched.step()
        _sync(device)
        step_times.append(time.perf_counter() - t0)
    json.dump({"step_s": step_times, "loop_s": step_times, "tokens": tokens, "samples": samples,
               "model_flops_per_step": _model_flops_per_step(model, samples[-1], tokens[-1]), "world_size": 1,
               "device": str(device), "trainable_params": model.trainable_parameter_count(),
               "frozen_params": model.frozen_parameter_count(), "threads": torch.get_num_threads()},
              open(out, "w"))


# --------------------------------------------------------------------------- orchestration


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _peak_flops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    name = _device_name()
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12
    return None  # CPU: MFU is not meaningful here


def _run_worker(args: argparse.Namespace, mode: str, strategy: str, ranks: int, workdir: Path) -> dict:
    import torch

    from vla_scale.train.distributed import free_port

    out = workdir / f"{mode}_{strategy}_{ranks}.json"
    common = ["--worker", mode, "--strategy", strategy, "--out", str(out), "--source", str(args.source),
              "--steps", str(args.steps), "--global-batch", str(args.global_batch),
              "--micro-batch", str(args.micro_batch), "--image-size", str(args.image_size)]
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if strategy == "deepspeed":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", __file__, *common]
    else:
        cmd = [sys.executable, __file__, *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if not out.is_file():  # judged by what it wrote (DeepSpeed may abort at exit after writing)
        raise SystemExit(f"{mode}/{strategy}/{ranks} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def _summarise(name: str, raw: dict, warmup: int, peak: float | None) -> dict:
    step = raw["step_s"][warmup:]
    loop = raw["loop_s"][max(warmup - 1, 0):]
    tokens = statistics.mean(raw["tokens"][warmup:])
    samples = statistics.mean(raw["samples"][warmup:])
    world = raw["world_size"]
    med_step, med_loop = statistics.median(step), statistics.median(loop)
    row = {"name": name, "ranks": world, "device": raw["device"], "threads_per_rank": raw["threads"],
           "step_time_s": med_step, "loop_time_s": med_loop, "step_time_s_spread": [min(step), max(step)],
           "tokens_per_step": tokens, "samples_per_step": samples,
           "tokens_per_s": tokens / med_loop, "tokens_per_s_per_device": tokens / med_loop / world,
           "samples_per_s": samples / med_loop, "trainable_params": raw["trainable_params"],
           "frozen_params": raw["frozen_params"]}
    row["mfu"] = raw["model_flops_per_step"] / (med_loop * world * peak) if peak else None
    return row


def _machine() -> dict:
    import deepspeed  # noqa: F401  (version only)
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": _device_name(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "platform": platform.platform()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="leading steps left out of the medians")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--llm-hidden", type=int, default=256)
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="DeepSpeed rank counts to run")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per device, for MFU")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/train_step_<device>.json)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (the fastest is kept)")
    p.add_argument("--timeout", type=int, default=1200)
    # internal: one configuration in this process
    p.add_argument("--worker", choices=("bare", "framework"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    p.add_argument("--source", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        args.mode = args.worker
        (worker_bare if args.worker == "bare" else worker_framework)(args)
        return

    import torch

    from vla_scale.models.tiny import build_tiny_llava

    with tempfile.TemporaryDirectory(prefix="vla_bench_") as tmp:
        workdir = Path(tmp)
        args.source = build_tiny_llava(workdir / "source", image_size=args.image_size, llm_hidden=args.llm_hidden,
                                       llm_layers=args.llm_layers)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
        peak = _peak_flops(args)
        runs = [("bare PyTorch loop", "bare", "single", 1), ("single-process strategy", "framework", "single", 1),
                ("bare DeepSpeed loop, 1 rank", "bare", "deepspeed", 1)]
        runs += [(f"DeepSpeed strategy, {n} rank{'s' if n > 1 else ''}", "framework", "deepspeed", n)
                 for n in args.ranks]
        # Repeats are interleaved and the fastest median of each configuration is kept: on a shared
        # machine other processes only ever make a run slower.
        best: dict[str, dict] = {}
        for rep in range(args.repeats):
            for name, mode, strategy, ranks in runs:
                print(f"[{rep + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
                row = _summarise(name, _run_worker(args, mode, strategy, ranks, workdir), args.warmup, peak)
                if name not in best or row["loop_time_s"] < best[name]["loop_time_s"]:
                    best[name] = row
        rows = [best[name] for name, *_ in runs]
    # Overheads on one device: the single strategy against the bare PyTorch loop, the DeepSpeed
    # strategy against the bare DeepSpeed loop on the same engine (what vla-scale adds), and the
    # bare DeepSpeed loop against bare PyTorch (what ZeRO-3 itself costs).
    by_name = {r["name"]: r for r in rows}
    baselines = {"single-process strategy": "bare PyTorch loop", "bare DeepSpeed loop, 1 rank": "bare PyTorch loop",
                 "DeepSpeed strategy, 1 rank": "bare DeepSpeed loop, 1 rank"}
    for row in rows:
        base = by_name.get(baselines.get(row["name"], ""))
        row["baseline"] = base["name"] if base else None
        row["step_overhead"] = row["step_time_s"] / base["step_time_s"] - 1 if base else None
        row["loop_overhead"] = row["loop_time_s"] / base["step_time_s"] - 1 if base else None
    result = {"machine": _machine(), "model": {"llm_hidden": args.llm_hidden, "llm_layers": args.llm_layers,
                                               "image_size": args.image_size,
                                               "trainable_params": rows[0]["trainable_params"],
                                               "frozen_params": rows[0]["frozen_params"]},
              "batch": {"global": args.global_batch, "micro": args.micro_batch}, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "peak_flops_per_device": peak,
              "precision": "bf16" if torch.cuda.is_available() else "fp32", "results": rows}
    dev = "cpu" if not torch.cuda.is_available() else _device_name().replace(" ", "_").lower()
    out = Path(args.out or REPO / "benchmarks" / "results" / f"train_step_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    def pct(x):
        return f"{100 * x:+.1f}%" if x is not None else "-"

    print(f"\n{result['machine']['device']} ({result['machine']['cpu']}, {result['machine']['cores']} cores), "
          f"torch {result['machine']['torch']}, deepspeed {result['machine']['deepspeed']}, {result['precision']}")
    print(f"model: {rows[0]['trainable_params'] / 1e6:.2f}M trainable + {rows[0]['frozen_params'] / 1e6:.2f}M "
          f"frozen; global batch {args.global_batch}, micro-batch {args.micro_batch}; medians of steps "
          f"{args.warmup + 1}..{args.steps}\n")
    head = (f"{'configuration':<30} {'ranks':>5} {'step s':>8} {'loop s':>8} {'tokens/s':>9} {'tok/s/dev':>9} "
            f"{'step ovh':>9} {'loop ovh':>9} {'MFU':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['name']:<30} {r['ranks']:>5} {r['step_time_s']:>8.4f} {r['loop_time_s']:>8.4f} "
              f"{r['tokens_per_s']:>9.0f} {r['tokens_per_s_per_device']:>9.0f} "
              f"{pct(r.get('step_overhead')):>9} {pct(r.get('loop_overhead')):>9} {mfu:>6}")
    print("\noverheads: single vs bare PyTorch; bare DeepSpeed vs bare PyTorch (ZeRO-3's own cost); "
          "DeepSpeed strategy vs bare DeepSpeed (what vla-scale adds)")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
