"""DeepSpeed ZeRO-3 training strategy: `model.core` sharded over the ranks, the frozen encoders beside it.

What lives where, per rank:
- `model.core` (trainable encoders, projector, LLM): ZeRO-3 parameters.
  Each rank stores 1/N of every parameter (plus DeepSpeed's padding), of
  its gradient and of the fp32 master weights and Adam moments; a layer's
  parameters are all-gathered just before its forward/backward and released
  after (parameters under `stage3_param_persistence_threshold` stay
  gathered).
- `model.frozen` (the frozen encoders): plain replicated modules, bf16 on
  GPU, `eval()`, no gradients, run under `no_grad` BEFORE the engine's
  forward; their features enter `core.forward` as inputs. DeepSpeed never
  sees them: no ZeRO attributes, no optimizer state, no all-gathers.

How the core becomes ZeRO-3 (the loading approach). Rank 0 alone runs
`build_vla`, which assembles the VLA on the host with pretrained weights and
all the surgery (taking the source VLM apart, the siamese [W/2 | W/2]
projector split, embedding resize), so that code has exactly one home. The
other ranks receive its skeleton (`vla_scale.models.loading.build_vla_on_rank0`:
the same modules, parameters on the meta device), the frozen encoders'
weights by broadcast straight onto their device, and nothing else. Then
`deepspeed.zero.Init(module=...)` converts the core in place, one parameter
at a time: (on a skeleton rank, give it storage on the device,) broadcast
rank 0's values, keep this rank's partition, free the full tensor. This is
DeepSpeed's documented way to "partition the model as if it was constructed
in the context"; rank 0 is the single source of truth for the weights, as
with `GatheredParameters(modifier_rank=0)` loading. Host memory at start:
rank 0 holds one full fp32 copy (4 bytes/parameter: ~28 GB for a 7B
model), every other rank none of it, so an 8-GPU node holds one copy instead
of eight; device memory never holds more than one full core parameter.
`deepspeed.build_on_every_rank=true` restores the build on every rank.

One optimizer step: one all-reduce of the step's answer-token count (the
loss divisor: the objective is the global batch's token mean, see
`vla_scale.train.strategy`), then for each micro-batch, frozen features ->
engine forward -> engine.backward -> engine.step (DeepSpeed accumulates gradients and steps
the optimizer and the client LR scheduler at the accumulation boundary).
The optimizer is a `torch.optim.AdamW` (no FusedAdam JIT build on CPU), the
LR scheduler the single strategy's (`vla_scale.train.schedule`), clipping is
DeepSpeed's (`gradient_clipping` = train.grad_clip; same formula as
`clip_grad_norm_`), so both strategies train the same function.

Non-finite loss (train.on_nonfinite). Before the last micro-batch's
backward, one all-reduce sums the step's loss over all ranks; a NaN/inf on ANY rank makes the global loss non-finite, so every
rank takes the same decision:
- "stop": raise TrainingError before the last backward; no weights change
  (DeepSpeed only applies updates at the boundary `step()`, never reached).
- "skip": the last backward is run on `loss * nan`, which makes the global
  gradient norm NaN; ZeRO-3's own overflow path (the one fp16 loss scaling
  uses) then clears the gradients and skips the update on every rank while
  DeepSpeed's counters stay consistent. DeepSpeed does not step the LR
  scheduler on a skipped step; we do, so the LR stays a function of the
  step number, as in the single strategy. A step DeepSpeed skips for a
  non-finite gradient with a finite loss is handled the same way.

Checkpoints: `engine.save_checkpoint(step_dir, tag="global_step<N>")`, i.e.
DeepSpeed's own layout inside our step directory (`latest`,
`global_step<N>/`, `zero_to_fp32.py`), so `zero_to_fp32.py` and
`ds_to_universal.py` work on a step directory unchanged. A checkpoint
written by a different number of ranks is converted to a universal
checkpoint by rank 0 (`python -m deepspeed.checkpoint.ds_to_universal`,
into a temporary folder of the run that is deleted after loading) and
loaded with DeepSpeed's universal loader.

This module must never give a frozen-encoder parameter to DeepSpeed, never
build a DeepSpeed optimizer from the JSON (ours is the client optimizer),
and never write outside the checkpoint directory it is handed, except the
temporary universal-conversion folder of its own run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from vla_scale.config.schema import Config, ModelConfig
from vla_scale.errors import CheckpointError, ConfigError, TrainingError
from vla_scale.models.loading import MaterializingView, build_vla, build_vla_on_rank0
from vla_scale.models.vla import VisionLanguageActionModel, model_inputs, prefix_tokens
from vla_scale.train import distributed
from vla_scale.train.batching import resolve_accumulation
from vla_scale.train.checkpoint import TMP_MARK, fsync_files, read_metadata
from vla_scale.train.metrics import ModelFlops, PhaseTimer
from vla_scale.train.schedule import build_scheduler
from vla_scale.train.strategy import StepResult, Strategy, answer_tokens, make_optimizer, trainable_parameters

log = logging.getLogger(__name__)

# Keys of a user's DeepSpeed JSON that our typed config owns: the loader cuts
# batches from train.*, and the optimizer/scheduler are ours (client objects).
_OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation",
    "optimizer": "train.lr, train.betas, train.eps, train.weight_decay",
    "scheduler": "train.schedule, train.warmup_steps, train.min_lr_ratio",
}
UNIVERSAL_DIR = "universal_tmp"  # inside the run directory; exists only while a conversion is loaded


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """"bf16" or "fp32": model.precision, with "auto" = bf16 on GPU, fp32 on CPU."""
    p = cfg.model.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_deepspeed_config(cfg: Config, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: generated from the typed config, then the user's file over it."""
    t, d = cfg.train, cfg.deepspeed
    if d.stage != 3:
        raise ConfigError(f"deepspeed.stage={d.stage}: this strategy is ZeRO-3 only (the frozen encoders are kept "
                          "out of a ZeRO-3 engine); use train.strategy=single for one device")
    gas = resolve_accumulation(t, world_size)
    bf16 = resolve_precision(cfg, device) == "bf16"
    generated: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(t.grad_clip),
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": d.overlap_comm,
            "contiguous_gradients": d.contiguous_gradients,
            "reduce_bucket_size": d.reduce_bucket_size,
            "stage3_prefetch_bucket_size": d.stage3_prefetch_bucket_size,
            "stage3_param_persistence_threshold": d.stage3_param_persistence_threshold,
            "stage3_max_live_parameters": d.stage3_max_live_parameters,
            "stage3_max_reuse_distance": d.stage3_max_reuse_distance,
            "stage3_gather_16bit_weights_on_model_save": d.stage3_gather_16bit_weights_on_model_save,
            # DeepSpeed's memory-efficient linear replaces torch.nn.functional.linear for the whole
            # process (the frozen encoders and evaluation included) and is not needed for ZeRO-3
            # correctness: autograd keeps the parameter, which ZeRO re-gathers before backward.
            "memory_efficient_linear": False,
        },
        # Gradient numerics (deepspeed.grad_accum_dtype / communication_data_type): under bf16,
        # DeepSpeed would otherwise accumulate and reduce-scatter gradients in bf16.
        "data_types": {"grad_accum_dtype": d.grad_accum_dtype if bf16 else "fp32"},
        "communication_data_type": d.communication_data_type if bf16 else "fp32",
        "steps_per_print": 2**31 - 1,  # we log; DeepSpeed's progress lines would interleave with ours
        "wall_clock_breakdown": False,
    }
    if not d.config_file:
        return generated
    path = Path(d.config_file)
    try:
        user = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"deepspeed.config_file: cannot read {path}: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config_file: {path} must hold a JSON object")
    for key, ours in _OWNED_KEYS.items():
        if key in user and user[key] not in ("auto", generated.get(key)):
            raise ConfigError(f"deepspeed.config_file {path}: '{key}' is set by {ours} in the vla-scale config; "
                              f"remove it from the JSON (or use \"auto\")")
    user = {k: v for k, v in user.items() if user[k] != "auto"}
    merged = _deep_merge(generated, user)
    if merged.get("zero_optimization", {}).get("stage") != 3:
        raise ConfigError(f"deepspeed.config_file {path}: zero_optimization.stage must stay 3")
    if merged.get("fp16", {}).get("enabled"):
        # fp16 loss scaling skips steps on overflow as a matter of course; our non-finite policy
        # (train.on_nonfinite) would count or stop on them. bf16 needs no loss scaling.
        raise ConfigError(f"deepspeed.config_file {path}: fp16 is not supported; use model.precision=bf16")
    return merged


def numerics_line(ds_config: dict[str, Any]) -> str:
    """What a run's gradients are computed, accumulated and reduced in (printed by rank 0 at start)."""
    precision = "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"
    accum = ds_config.get("data_types", {}).get("grad_accum_dtype") or precision
    comm = ds_config.get("communication_data_type") or precision
    return (f"DeepSpeed ZeRO-3 numerics: {precision} parameters and activations, gradients accumulated in {accum} "
            f"and reduce-scattered in {comm}, fp32 master weights and Adam state")


class _EngineView(torch.nn.Module):
    """`VLACore` as DeepSpeed needs to see it: the same children, a tuple out.

    ZeRO-3 attaches its pre-backward hooks to the tensors a module returns,
    and finds them only in tuples, lists and dicts; `VLACore` returns a
    dataclass. This view holds the core's own children under the same names
    (so parameter names, hence checkpoint keys, are the core's) and returns
    `VLAOutput`'s fields as a tuple. `core` itself has no parameters of its
    own, so nothing is lost by DeepSpeed not seeing it.
    """

    def __init__(self, core: torch.nn.Module):
        super().__init__()
        for name, child in core.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_core", core)  # not a child: its children are ours already

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:  # VLACore.forward's arguments
        out = self._core(*args, **kwargs)
        return out.loss, out.sample_loss_sum, out.sample_tokens, out.sample_correct, out.sample_choices


@contextlib.contextmanager
def _universal_loading(engine: Any) -> Iterator[None]:
    # The engine reads checkpoint.load_universal from its config at load time; the flag is
    # only needed for this one load, and re-initialising the engine to set it would rebuild
    # the optimizer's partitions for nothing.
    cfg = engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        yield
    finally:
        cfg.load_universal_checkpoint = before


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger as ds_logger

    if not logging.getLogger("vla_scale").isEnabledFor(logging.INFO):
        ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # every collective warns on torch 2.13


class DeepSpeedStrategy(Strategy):
    """ZeRO-3 over `model.core`; the frozen encoders replicated outside the engine (see module docstring)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.env = distributed.init_distributed()
        self.rank, self.world_size, self.device = self.env.rank, self.env.world_size, self.env.device
        self.ds_config = build_deepspeed_config(cfg, self.world_size, self.device)
        # From the final config: a user's JSON may switch bf16 on or off.
        self.precision = "bf16" if self.ds_config.get("bf16", {}).get("enabled") else "fp32"
        if self.rank == 0:
            line = numerics_line(self.ds_config)
            if cfg.train.progress:
                print(line, flush=True)
            else:
                log.info("%s", line)
        self.nonfinite_steps = 0
        self.engine: Any = None

    # ------------------------------------------------------------------ setup

    def build_model(self, cfg: ModelConfig) -> tuple[VisionLanguageActionModel, Any]:
        """Rank 0 builds, the others get a skeleton (module docstring); every rank builds with build_on_every_rank."""
        if self.world_size == 1 or self.cfg.deepspeed.build_on_every_rank:
            return build_vla(cfg)
        return build_vla_on_rank0(cfg, self.device)

    def setup(self, model: VisionLanguageActionModel) -> None:
        import deepspeed

        _quiet_deepspeed()
        # DeepSpeed's comm layer over our process group (it reads the world size from it, e.g. to
        # check the batch arithmetic in zero.Init below); no new group is created.
        deepspeed.init_distributed(dist_backend=self.env.backend, auto_mpi_discovery=False,
                                   dist_init_required=False)
        self.model = model
        # Frozen encoders: replicated, 2 bytes/parameter on GPU, never wrapped (see ARCHITECTURE.md).
        model.frozen.to(self.device, dtype=torch.bfloat16 if self.device.type == "cuda" else None)
        core = model.core
        if self.precision == "bf16":
            # The low-precision copy ZeRO shards (fp32 masters live in the optimizer). Parameters
            # only: buffers such as RoPE's inv_freq keep their fp32 precision.
            for p in core.parameters():
                p.data = p.data.to(torch.bfloat16)
        # On ranks holding a skeleton, each core parameter gets storage just before its broadcast.
        deepspeed.zero.Init(module=MaterializingView(core, self.device), config_dict_or_path=self.ds_config)
        params = trainable_parameters(model)  # after zero.Init: a skeleton's parameters were replaced
        for module in core.modules():  # zero.Init moves parameters only
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(self.device)
        frozen_ids = {id(p) for p in model.frozen.parameters()}
        assert not any(hasattr(p, "ds_id") for p in model.frozen.parameters()), "a frozen encoder became ZeRO-3"
        assert not frozen_ids & {id(p) for p in params}
        optimizer = make_optimizer(params, self.cfg)
        self._group_weight_decay = [g["weight_decay"] for g in optimizer.param_groups]
        t = self.cfg.train
        self.scheduler = build_scheduler(optimizer, warmup_steps=t.warmup_steps, total_steps=t.steps,
                                         schedule=t.schedule, min_lr_ratio=t.min_lr_ratio)
        self.engine, _, _, _ = deepspeed.initialize(model=_EngineView(core), model_parameters=params,
                                                    optimizer=optimizer,
                                                    lr_scheduler=self.scheduler, config=self.ds_config,
                                                    dist_init_required=False)
        self.flops_model = ModelFlops(model)
        if self.cfg.train.sync_timing:
            # DeepSpeed's comms logger times each of ZeRO's collectives (blocking it: profiling only); its
            # total per step is the step's "comm" phase. After initialize, which applies the JSON's setting.
            deepspeed.comm.configure(enabled=True, prof_all=True, verbose=False)

    # ------------------------------------------------------------------ one step

    def _to_device(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        engine = self.engine
        n = len(micro_batches)
        if n != engine.gradient_accumulation_steps():
            raise TrainingError(f"the loader gave {n} micro-batches for a step; DeepSpeed accumulates "
                                f"{engine.gradient_accumulation_steps()} (train.* batch sizes and the world size "
                                "disagree)")
        engine.train()
        self.model.core.train()  # the view's children are the core's; this also sets the core's own flag
        timer = PhaseTimer(self.device, sync=self.cfg.train.sync_timing)
        ds_comm_before = _deepspeed_comm_seconds()
        # One collective before any backward: the global answer-token count (the loss divisor, see
        # vla_scale.train.strategy) and the step's sample, token and model-FLOP counts, from the host copies.
        samples = sum(mb["input_ids"].shape[0] for mb in micro_batches)
        tokens = sum(int(mb["attention_mask"].sum()) + int(prefix_tokens(mb, self.model.num_image_tokens).sum())
                     for mb in micro_batches)
        counts = torch.tensor([float(answer_tokens(micro_batches)), float(samples), float(tokens),
                               self.flops_model.step_flops(micro_batches)], dtype=torch.float64, device=self.device)
        with timer.phase("comm"):
            n_items, g_samples, g_tokens, g_flops = distributed.all_reduce_sum(counts).tolist()
        num_items = torch.tensor(max(n_items, 1.0), dtype=torch.float32, device=self.device)
        # Each micro-batch's loss is already its share of the global objective. DeepSpeed would divide it
        # by the accumulation steps (scale_wrt_gas) and ZeRO averages gradients over the ranks: the first
        # is switched off, the second undone by scaling with the world size.
        rank_scale = float(self.world_size)
        sums, toks, corr, chs, srcs = [], [], [], [], []
        lr = self.scheduler.get_last_lr()[0]
        global_loss_sum = math.nan
        for i, mb in enumerate(micro_batches):
            with timer.phase("forward"):
                mb = self._to_device(mb)
                feats = self.model.frozen(mb["pixel_values"])
                loss, loss_sum, n_tok, n_correct, n_choices = engine(mb["pixel_values"], mb["input_ids"],
                                                                     mb["attention_mask"], mb["labels"], feats,
                                                                     num_items, mb.get("choice_mask"),
                                                                     **model_inputs(mb))
            sums.append(loss_sum)
            toks.append(n_tok)
            corr.append(n_correct)
            chs.append(n_choices)
            srcs.append(mb["source"])
            if i == n - 1:
                # The global loss, for the log and for the non-finite decision, which every rank must
                # take the same way.
                with timer.phase("comm"):
                    global_loss_sum = distributed.all_reduce_sum(torch.cat(sums).sum().double()).item()
                if not math.isfinite(global_loss_sum):
                    if self.cfg.train.on_nonfinite == "stop":
                        self.nonfinite_steps += 1
                        raise TrainingError(f"non-finite loss ({global_loss_sum}) on at least one rank; stopping "
                                            "(train.on_nonfinite=stop)")
                    loss = loss * float("nan")  # route the step through ZeRO's overflow skip (module docstring)
            with timer.phase("backward"):
                engine.backward(loss * rank_scale, scale_wrt_gas=False)
            if i == n - 1 and self.grad_probe is not None:
                self.grad_probe(self._full_gradients())
            with timer.phase("optimizer"):
                engine.step()
        global_loss = global_loss_sum / max(n_items, 1.0)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan
        skipped = not engine.was_step_applied()
        if skipped:
            self.nonfinite_steps += 1
            if self.cfg.train.on_nonfinite == "stop":
                raise TrainingError(f"non-finite gradient norm ({grad_norm}); stopping (train.on_nonfinite=stop)")
            if self.is_main:
                warnings.warn(f"non-finite loss ({global_loss}) or gradient norm ({grad_norm}): step skipped "
                              f"({self.nonfinite_steps} so far)", RuntimeWarning, stacklevel=2)
            with warnings.catch_warnings():  # DeepSpeed skipped the optimizer; the LR still follows the step
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
        phases = dict(timer.seconds)
        ds_comm = _deepspeed_comm_seconds()
        if ds_comm is not None and ds_comm_before is not None:  # ZeRO's own collectives, when logged
            phases["comm"] = phases.get("comm", 0.0) + ds_comm - ds_comm_before
        return StepResult(global_loss, grad_norm, lr, skipped, int(g_samples), int(g_tokens),
                          torch.cat(sums).detach(), torch.cat(toks).detach(), torch.cat(corr).detach(),
                          torch.cat(chs).detach(), torch.cat(srcs), phases=phases, flops=g_flops)

    def _full_gradients(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter's full fp32 gradient, reduced over ranks (collective: every rank calls it)."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in self.model.core.named_parameters():
            if p.requires_grad:
                g = safe_get_full_grad(p)
                if g is not None:
                    out[name] = g.detach().to("cpu", copy=True).reshape(getattr(p, "ds_shape", p.shape))
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self, ckpt_dir: Path) -> None:
        tag = f"global_step{self.engine.global_steps}"
        # save_latest writes DeepSpeed's `latest` (naming the tag) into the step directory, which
        # is what zero_to_fp32.py reads when given the directory alone.
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"nonfinite_steps": self.nonfinite_steps},
                                    save_latest=True)
        if not self.is_main:  # rank 0 fsyncs the whole tree before sealing it; others flush their own shards
            fsync_files(sorted((ckpt_dir / tag).glob(f"*_rank_{self.engine.global_rank}_*")))

    def load(self, ckpt_dir: Path) -> None:
        ckpt_dir = Path(ckpt_dir)
        tag = deepspeed_tag(ckpt_dir)
        saved_ws = int(read_metadata(ckpt_dir).get("world_size", self.world_size))
        if saved_ws == self.world_size:
            client = self._load(ckpt_dir, tag, universal=False)
        else:
            if self.is_main:
                log.warning("%s was written by %d ranks, this run has %d: converting it to a DeepSpeed "
                            "universal checkpoint", ckpt_dir, saved_ws, self.world_size)
            folder = self._convert_to_universal(ckpt_dir, tag)
            try:
                client = self._load(folder, tag, universal=True)
                self._repair_after_universal_load()
            finally:
                self.barrier()  # everyone has read the converted files
                if self.is_main:
                    shutil.rmtree(folder.parent, ignore_errors=True)  # the whole temporary root
        self.nonfinite_steps = int((client or {}).get("nonfinite_steps", 0))

    def _repair_after_universal_load(self) -> None:
        """Undo two shortcuts of DeepSpeed's ZeRO-3 universal loader (0.19) that change the next updates.

        1. It gives every optimizer sub-group the SAME `step` tensor; AdamW
           increments it in place once per sub-group step, so with our two
           groups (decay / no decay) the bias correction would run ahead by
           one per step. Each state gets its own copy.
        2. It copies group 0's hyperparameters into every group, which would
           put weight decay on the no-decay group (biases, norms). Ours are
           restored (the LR is the scheduler's and equal across groups).
        """
        base = self.engine.optimizer.optimizer
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        for group, wd in zip(base.param_groups, self._group_weight_decay):
            group["weight_decay"] = wd

    def _load(self, load_dir: Path, tag: str, universal: bool) -> dict[str, Any]:
        ctx = _universal_loading(self.engine) if universal else contextlib.nullcontext()
        try:
            with ctx:
                path, client = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
        except (OSError, RuntimeError, EOFError, KeyError, ValueError, AssertionError) as e:
            raise CheckpointError(f"cannot load the DeepSpeed checkpoint {load_dir / tag}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint '{tag}' in {load_dir}")
        return client or {}

    def _convert_to_universal(self, ckpt_dir: Path, tag: str) -> Path:
        """Rank 0 runs DeepSpeed's ds_to_universal into a temporary folder of this run; every rank gets its path."""
        result: dict[str, str] = {}
        if self.is_main:
            root = Path(self.cfg.run.output_dir) / UNIVERSAL_DIR
            shutil.rmtree(root, ignore_errors=True)  # a conversion left by a crashed attempt
            folder = root / f"{ckpt_dir.name}{TMP_MARK}{secrets.token_hex(4)}"
            folder.mkdir(parents=True)
            workers = max(1, min(4, (os.cpu_count() or 1) // max(1, self.env.local_world_size)))
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(ckpt_dir / tag), "--output_folder", str(folder / tag), "--num_extract_workers",
                   str(workers), "--num_merge_workers", str(max(1, workers // 2))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                result = {"error": f"ds_to_universal failed on {ckpt_dir / tag} (exit {proc.returncode}): "
                                   + " | ".join(tail)}
            else:
                result = {"folder": str(folder)}
        result = self.broadcast_object(result)  # also the barrier: nobody loads before the conversion is done
        if "error" in result:
            raise CheckpointError(result["error"])
        return Path(result["folder"])

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """`model.core`'s state dict on CPU, gathered one parameter at a time (collective: call on every rank).

        The values are the module's (compute-precision) weights; the fp32
        masters of a bf16 run are in the checkpoint (zero_to_fp32).
        """
        import deepspeed

        out: dict[str, torch.Tensor] = {}
        done: dict[int, torch.Tensor] = {}
        for name, t in self.model.core.state_dict(keep_vars=True).items():
            if id(t) not in done:
                if hasattr(t, "ds_id"):
                    with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                        done[id(t)] = t.detach().to("cpu", copy=True)
                else:
                    done[id(t)] = t.detach().to("cpu", copy=True)
            out[name] = done[id(t)]
        return out

    @contextlib.contextmanager
    def full_model(self) -> Iterator[None]:
        """Every core parameter gathered on every rank for the duration (validation decodes with plain module
        calls and reads the LM head's rows directly). Costs one full copy of the core in compute precision
        per rank while it lasts (7B in bf16: 14 GB)."""
        import deepspeed

        params = [p for p in self.model.core.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            # ZeRO-3's post-forward hooks release a parameter once no active submodule holds it, which
            # would empty the LM head between decode steps (they read its rows directly). A marker in
            # each parameter's active set keeps them gathered until the context partitions them again.
            marker = -1 - id(self)
            for p in params:
                p.ds_active_sub_modules.add(marker)
            try:
                yield
            finally:
                for p in params:
                    p.ds_active_sub_modules.discard(marker)

    # ------------------------------------------------------------------ collectives

    def barrier(self) -> None:
        distributed.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return distributed.broadcast_object(obj, src)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(tensor)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None


def _deepspeed_comm_seconds() -> float | None:
    """Total time of the collectives DeepSpeed's comms logger has recorded so far; None when it is off."""
    from deepspeed.comm.comm import comms_logger, timers

    if not comms_logger.enabled:
        return None
    # One timer per logged op name; each accumulates over the run (the logger records the running total).
    return sum(t.elapsed(reset=False) for t in timers.get_timers().values()) / 1e3  # ms -> s


def deepspeed_tag(ckpt_dir: Path) -> str:
    """The DeepSpeed tag (e.g. "global_step40") of a step directory written by this strategy."""
    latest = Path(ckpt_dir) / "latest"
    try:
        tag = latest.read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} holds no DeepSpeed checkpoint ({latest} is missing); was it written "
                              "by train.strategy=single?") from None
    if not (Path(ckpt_dir) / tag).is_dir():
        raise CheckpointError(f"{latest} names '{tag}', which is not a folder of {ckpt_dir}")
    return tag


def is_deepspeed_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / "latest").is_file()
