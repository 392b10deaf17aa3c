"""Training strategies: how one optimizer step is executed, behind one seam.

The trainer loop (`vla_scale.train.trainer`) is the same for every strategy;
a strategy owns the optimizer, the LR scheduler, the device placement, the
process group and the checkpoint files of the trainable part.
`SingleProcessStrategy` is the debugging/CPU path and the numerical
reference; `DeepSpeedStrategy` (`vla_scale.train.deepspeed_strategy`)
implements the same interface over `model.core` only, with ZeRO-3. No
strategy ever gives the frozen encoders to an optimizer. This module never
imports another strategy: `vla_scale.train.strategies.make_strategy` picks one.

The objective of one optimizer step is the same for every strategy and every
way of cutting the global batch (micro-batch size, accumulation steps, ranks):

    loss = sum of token cross-entropies over the answer tokens of the global batch
           / number of answer tokens in the global batch

The count is taken from the labels before any backward pass (summed over the
step's micro-batches and, under several ranks, all-reduced), and every
micro-batch's summed loss is divided by it (`num_items`, as Hugging Face's
`num_items_in_batch`). A mean per micro-batch, averaged over micro-batches,
would weight a short VQA answer's tokens more than a long action's whenever the
micro-batches differ in composition.

Every strategy times the phases of its step (`PhaseTimer`: forward,
backward, optimizer, communication; device-synchronized only with
`train.sync_timing` on a GPU) and counts the step's model FLOPs
(`ModelFlops`, from the host copies of the batches), both on `StepResult`,
for the trainer's throughput log and `vla-scale profile`.

`Strategy.grad_probe`, when set, is called with the full gradient of every
trainable parameter after the step's backward passes and before clipping and
the update (a collective under ZeRO-3: set it on every rank). It exists for
tests and debugging; it costs a gather of every gradient.

The collectives on the seam (`barrier`, `broadcast_object`,
`all_reduce_sum`) are what the trainer and the checkpoint manager need to be
multi-rank correct; in a world of one they are no-ops.
"""
from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vla_scale.config.schema import Config, ModelConfig
from vla_scale.errors import CheckpointError, TrainingError
from vla_scale.models.loading import build_vla
from vla_scale.models.vla import VisionLanguageActionModel, count_answer_tokens, prefix_tokens
from vla_scale.train.metrics import ModelFlops, PhaseTimer
from vla_scale.train.schedule import build_scheduler

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float  # token-weighted mean loss over the step's answer tokens, all ranks together
    grad_norm: float  # global gradient norm before clipping
    lr: float
    skipped: bool
    samples: int  # samples of the step, all ranks together
    tokens: int  # input tokens of the step, image tokens included, all ranks together (for throughput)
    # Per-sample sums of THIS rank's micro-batches, concatenated (for per-source metrics,
    # which the trainer reduces over ranks with `Strategy.all_reduce_sum`).
    sample_loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    sample_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    sample_correct: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    sample_choices: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    source: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # Seconds per phase of the step on this rank (`PhaseTimer`): forward, backward, optimizer, comm.
    phases: dict[str, float] = field(default_factory=dict)
    # Model FLOPs of the step, all ranks together (`ModelFlops`); None when not counted.
    flops: float | None = None


def trainable_parameters(model: VisionLanguageActionModel) -> list[torch.nn.Parameter]:
    params = [p for p in model.core.parameters() if p.requires_grad]
    frozen = {id(p) for p in model.frozen.parameters()}
    assert not any(id(p) in frozen for p in params), "a frozen encoder parameter reached the optimizer"
    return params


def make_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    # No weight decay on biases and norms (the usual rule; the paper's recipe uses 0 anyway).
    # A ZeRO-3 parameter's own tensor is an empty placeholder: its shape is in `ds_shape`.
    ndim = {id(p): len(getattr(p, "ds_shape", p.shape)) for p in params}
    decay = [p for p in params if ndim[id(p)] >= 2]
    no_decay = [p for p in params if ndim[id(p)] < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                             foreach=True)


def resolve_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (unless fp32 is asked for), none on CPU."""
    p = cfg.model.precision
    if p == "fp32" or (p == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def answer_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> int:
    """Answer tokens of this rank's share of a step (host tensors: no device sync)."""
    return sum(int(count_answer_tokens(mb["labels"])) for mb in micro_batches)


GradProbe = Callable[[dict[str, torch.Tensor]], None]


class Strategy(ABC):
    rank: int = 0
    world_size: int = 1
    device: torch.device
    grad_probe: GradProbe | None = None  # see the module docstring

    def build_model(self, cfg: ModelConfig) -> tuple[VisionLanguageActionModel, Any]:
        """The VLA and its tokenizer, before `setup` (a collective when a strategy builds on one rank only)."""
        return build_vla(cfg)

    @abstractmethod
    def setup(self, model: VisionLanguageActionModel) -> None: ...

    @abstractmethod
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult: ...

    @abstractmethod
    def save(self, ckpt_dir: Path) -> None:
        """Write the trainable weights, optimizer and scheduler state into `ckpt_dir` (this rank's part)."""

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None: ...

    @abstractmethod
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered) state dict of `model.core`, on CPU, for exports."""

    def full_model(self):
        """Context in which `model` can be called as a plain module (validation; a collective under ZeRO-3)."""
        return nullcontext()

    # -- collectives (no-ops in a world of one) ------------------------------
    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` as rank `src` has it, on every rank."""
        return obj

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns `tensor`."""
        return tensor

    def close(self) -> None:
        """Release the process group and engine resources (end of the process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class SingleProcessStrategy(Strategy):
    """One process, one device: plain PyTorch (the reference every other strategy must match)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device()
        self.amp = autocast_dtype(cfg, self.device)
        self.nonfinite_steps = 0

    def setup(self, model: VisionLanguageActionModel) -> None:
        self.model = model.to(self.device)
        if self.device.type == "cuda":
            model.frozen.to(torch.bfloat16)  # frozen: 2 bytes/parameter, no master copy needed
        self.params = trainable_parameters(model)
        self.flops_model = ModelFlops(model)
        self.optimizer = make_optimizer(self.params, self.cfg)
        t = self.cfg.train
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=t.warmup_steps, total_steps=t.steps,
                                         schedule=t.schedule, min_lr_ratio=t.min_lr_ratio)

    def _autocast(self):
        if self.amp is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        self.model.core.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_items = torch.tensor(float(max(answer_tokens(micro_batches), 1)), device=self.device)
        flops = self.flops_model.step_flops(micro_batches)
        timer = PhaseTimer(self.device, sync=self.cfg.train.sync_timing)
        sums, toks, corr, chs, srcs = [], [], [], [], []
        samples = tokens = 0
        for mb in micro_batches:
            with timer.phase("forward"):
                mb = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
                with self._autocast():
                    out = self.model(mb, num_items=num_items)
            with timer.phase("backward"):
                out.loss.backward()
            sums.append(out.sample_loss_sum)
            toks.append(out.sample_tokens)
            corr.append(out.sample_correct)
            chs.append(out.sample_choices)
            srcs.append(mb["source"])
            samples += mb["input_ids"].shape[0]
            tokens += int(mb["attention_mask"].sum()) + int(prefix_tokens(mb, self.model.num_image_tokens).sum())
        loss_sum, tok_sum = torch.cat(sums).sum(), torch.cat(toks).sum()
        loss = float(loss_sum / tok_sum.clamp(min=1))
        if self.grad_probe is not None:
            self.grad_probe({n: p.grad.detach().clone() for n, p in self.model.core.named_parameters()
                             if p.requires_grad and p.grad is not None})
        clip = self.cfg.train.grad_clip
        with timer.phase("optimizer"):  # clipping reads the norm back: the step's one wait on the device
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf))
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        if skipped:
            self.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.cfg.train.on_nonfinite == "stop":
                raise TrainingError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                                    "stopping (train.on_nonfinite=stop)")
            warnings.warn(f"non-finite loss ({loss}) or gradient norm ({grad_norm}): step skipped "
                          f"({self.nonfinite_steps} so far)", RuntimeWarning, stacklevel=2)
            with warnings.catch_warnings():  # the LR stays a function of the step number
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
        else:
            with timer.phase("optimizer"):
                self.optimizer.step()
                self.scheduler.step()
        return StepResult(loss, grad_norm, lr, skipped, samples, tokens, torch.cat(sums).cpu(),
                          torch.cat(toks).cpu(), torch.cat(corr).cpu(), torch.cat(chs).cpu(), torch.cat(srcs).cpu(),
                          phases=timer.seconds, flops=flops)

    def save(self, ckpt_dir: Path) -> None:
        from safetensors.torch import save_model

        save_model(self.model.core, str(ckpt_dir / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "nonfinite_steps": self.nonfinite_steps}, ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir: Path) -> None:
        from safetensors.torch import load_model

        try:
            missing, unexpected = load_model(self.model.core, str(ckpt_dir / "model.safetensors"), strict=False,
                                             device=str(self.device))
            if missing or unexpected:
                raise CheckpointError(f"{ckpt_dir / 'model.safetensors'} does not match the model: "
                                      f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
            state = torch.load(ckpt_dir / "optimizer.pt", map_location=self.device, weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"cannot load checkpoint {ckpt_dir}: {str(e).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.core.state_dict().items()}
