"""Training metrics: throughput and MFU, per-source loss/accuracy, and the metrics log.

- `ThroughputMeter` turns step timings into samples/s, tokens/s, seconds per
  step and model FLOPs utilization (MFU), excluding warm-up steps.
- `transformer_flops_per_token` is the standard training-FLOPs estimate used
  for MFU; `ModelFlops` applies it to the whole VLA (formula below).
- `PhaseTimer` times the phases of one step (forward, backward, optimizer,
  communication) and marks them for `torch.profiler`; `peak_memory` reads
  the peak device memory (CUDA) or peak resident memory (CPU);
  `peak_flops_per_device` looks up the dense bf16 peak of a GPU.
- `PerSourceAccumulator` sums loss, token and correct-token counts per data
  source over the micro-batches of one optimizer step, on the device, and
  reads them back once per step.
- `MetricsLogger` appends one JSON line per logged step to
  `<run_dir>/metrics.jsonl` and mirrors the scalars to TensorBoard;
  `read_metrics` reads that file back.

MFU of a VLA step (`ModelFlops.step_flops`), model FLOPs only (activation
recomputation is not useful work):
- 6 x trainable parameters x the tokens they process, per component: the
  trainable encoders (image tokens plus their CLS/register tokens), the
  projector (image tokens), the LLM's blocks (every input token: text plus
  image). Input embedding tables are lookups, not matmuls, and are left out.
- The LM head only where it runs: `VLACore.forward` applies it at the answer
  positions alone, so 6 x head parameters x answer tokens.
- 2 x frozen-encoder parameters x the tokens each processes (forward only).
- Attention score and value matmuls (no weights): per sequence of T tokens
  and layer, 4 x T^2 x d_attn forward (d_attn = heads x head dim; the full
  T x T square, the PaLM convention, also for causal attention), times 3
  for forward + backward in trained towers and the LLM, times 1 in frozen
  encoders. T is each sample's own length (padding is not useful work).
MFU = model FLOPs per second per device / the device's dense peak FLOP/s
(`train.peak_flops`, else the bf16 table `PEAK_BF16_FLOPS` by device name;
none on CPU, where MFU is left out unless `train.peak_flops` is given).

Metric names carry their units (`tokens_per_s`, `step_time_s`, `mfu` as a
fraction of peak). Nothing here may synchronize a CUDA device on its own
initiative except `PerSourceAccumulator.compute` (once per step, by design),
and nothing here may write from a rank other than 0: the log is one file per
run, not per rank.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch

from vla_scale.train.checkpoint import write_bytes_atomic

if TYPE_CHECKING:
    from vla_scale.models.vla import VisionLanguageActionModel

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


# --------------------------------------------------------------------------- throughput


def transformer_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer: 6*N + 12*L*H*S.

    The PaLM (Chowdhery et al. 2022, appendix B) / Megatron-LM estimate:
    6*N counts the forward (2 FLOPs per parameter per token: one multiply, one
    add) and backward (twice the forward) matmuls with the weights; 12*L*H*S
    adds the attention score and value matmuls (QK^T and AV, each 2*H*S per
    token per layer forward, times 3 for forward + backward), which have no
    weights. N is the parameters that take part in forward AND backward
    (embedding lookups are not matmuls and are often left out). A frozen
    encoder only runs forward: add 2 * its parameters per image token
    yourself. Activation recomputation is not counted: MFU measures useful
    work, not hardware work.
    """
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


class ThroughputMeter:
    """Throughput over a window of optimizer steps.

    Call `start()` just before the first step of the window and `step(...)`
    right after each optimizer step, with the step's GLOBAL counts (all ranks
    together): samples, tokens and, for MFU, model FLOPs (e.g.
    `transformer_flops_per_token(...) * tokens`). The time of a step is the
    gap between consecutive calls, so data loading, logging and checkpointing
    in between are counted, as a user waiting for the run sees them.

    The first `warmup_steps` steps after `start()` are left out of the
    averages: they pay for compilation, autotuning and allocator growth.
    `reset()` starts a new averaging window (e.g. after each log line)
    without re-excluding warm-up steps.

    Timing uses `time.perf_counter` (or the injected `clock`). CUDA kernels
    run asynchronously: the caller must `torch.cuda.synchronize()` before
    `step()` (e.g. only on steps that are logged, or read a loss value,
    which synchronizes), otherwise the meter measures launch time, not
    compute time. The meter never synchronizes by itself.

    MFU = achieved model FLOP/s per device / `peak_flops_per_device`; it is
    reported only when a peak is given and every measured step passed flops.
    `peak_flops_per_device` is the dense peak of the datatype trained in
    (e.g. 989e12 for H100 SXM bf16), not the sparse figure.

    `phases` (seconds per named phase of the step: data, forward, backward,
    optimizer, checkpoint, comm) are averaged per step over the same window
    as `time/<phase>_s`; `time/other_s` is the rest of the step time. A phase
    that overlaps others (communication inside forward/backward) is named
    in `overlapping` and left out of that rest. `window_s` and
    `window_steps` say which wall time the rates divide by: tokens_per_s is
    exactly the window's tokens / window_s.
    """

    def __init__(
        self,
        *,
        warmup_steps: int = 1,
        peak_flops_per_device: float | None = None,
        num_devices: int = 1,
        clock: Callable[[], float] = time.perf_counter,
        overlapping: Sequence[str] = ("comm",),
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        if peak_flops_per_device is not None and peak_flops_per_device <= 0:
            raise ValueError(f"peak_flops_per_device must be positive, got {peak_flops_per_device}")
        self.warmup_steps = warmup_steps
        self.peak_flops_per_device = peak_flops_per_device
        self.num_devices = num_devices
        self.overlapping = frozenset(overlapping)
        self._clock = clock
        self._last: float | None = None
        self._seen = 0  # steps since start(), warm-up included
        self.reset()

    def start(self) -> None:
        """Begin measuring now; the next `warmup_steps` steps are excluded."""
        self._last = self._clock()
        self._seen = 0
        self.reset()

    def reset(self) -> None:
        """Clear the averaging window; warm-up already passed stays passed."""
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.flops = 0.0
        self.seconds = 0.0
        self.phase_seconds: dict[str, float] = {}
        self._flops_complete = True

    def step(self, samples: int, tokens: int, flops: float | None = None,
             phases: Mapping[str, float] | None = None) -> None:
        """Record one finished optimizer step (global counts over all ranks; `phases` in seconds)."""
        if self._last is None:
            raise RuntimeError("ThroughputMeter.step() called before start()")
        now = self._clock()
        elapsed, self._last = now - self._last, now
        self._seen += 1
        if self._seen <= self.warmup_steps:
            return
        self.steps += 1
        self.samples += samples
        self.tokens += tokens
        self.seconds += elapsed
        if flops is None:
            self._flops_complete = False
        else:
            self.flops += flops
        for name, seconds in (phases or {}).items():
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + seconds

    @property
    def step_time_s(self) -> float | None:
        return self.seconds / self.steps if self.steps else None

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.steps and self.seconds > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.steps and self.seconds > 0 else None

    @property
    def tokens_per_s_per_device(self) -> float | None:
        tps = self.tokens_per_s
        return tps / self.num_devices if tps is not None else None

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilization as a fraction (0.45 means 45%)."""
        if (
            self.peak_flops_per_device is None
            or not self.steps
            or self.seconds <= 0
            or not self._flops_complete
        ):
            return None
        achieved_per_device = self.flops / self.seconds / self.num_devices
        return achieved_per_device / self.peak_flops_per_device

    def summary(self) -> dict[str, float]:
        """The window's averages; keys whose value is not known yet are left out."""
        values = {
            "samples_per_s": self.samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_per_device": self.tokens_per_s_per_device,
            "step_time_s": self.step_time_s,
            "mfu": self.mfu,
        }
        if self.steps:
            values["window_s"] = self.seconds
            values["window_steps"] = float(self.steps)
            for name, seconds in self.phase_seconds.items():
                values[f"time/{name}_s"] = seconds / self.steps
            if self.phase_seconds:
                additive = sum(v for k, v in self.phase_seconds.items() if k not in self.overlapping)
                values["time/other_s"] = max(self.seconds - additive, 0.0) / self.steps
        return {k: v for k, v in values.items() if v is not None}


# --------------------------------------------------------------------------- model FLOPs and devices

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity), matched as
# substrings of `torch.cuda.get_device_name()` in this order (the more specific name first).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500e12), ("B200", 2250e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H200", 989e12), ("GH200", 989e12), ("H800", 989e12), ("H20", 148e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 6000 Ada", 364e12), ("A6000", 155e12), ("4090", 165e12), ("3090", 71e12),
)


def peak_flops_per_device(device: "torch.device | str", configured: float | None = None) -> float | None:
    """Dense peak FLOP/s of one device: `configured` (train.peak_flops) if given, else the bf16 table for a
    known GPU; None for a CPU or an unknown GPU (MFU is then not reported)."""
    if configured:
        return float(configured)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def peak_memory(device: "torch.device | str") -> tuple[str, float]:
    """(metric name, GiB) of this process's peak memory so far: CUDA max allocated on a GPU, peak resident
    set size (RSS, the whole process) on a CPU. The name says which was measured."""
    device = torch.device(device)
    if device.type == "cuda":
        return "peak_cuda_allocated_gib", torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return "peak_rss_gib", rss / 2**30


def _tower_shape(config: Any) -> tuple[int, int]:
    """(layers, attention width = heads x head dim) of a Hugging Face transformer config."""
    config = getattr(config, "text_config", None) or getattr(config, "vision_config", None) or config
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return layers, heads * int(head_dim)


class ModelFlops:
    """Model FLOPs of one training step of a `VisionLanguageActionModel` (the formula in the module docstring).

    Parameter counts are read once, at construction (ZeRO-3 partitions are counted at their full size);
    `step_flops` then needs only the host copies of the step's micro-batches (`attention_mask`, `labels`):
    no device work, no sync.
    """

    def __init__(self, model: "VisionLanguageActionModel") -> None:
        from vla_scale.models.vision import VisionEncoder
        from vla_scale.models.vla import param_numel

        core = model.core
        self.image_tokens = int(model.num_image_tokens)
        # Per image: (matmul FLOPs, attention FLOPs) of every tower, trainable x3, frozen x1.
        self.image_flops = 0.0
        for encoders, passes in ((core.encoders.values(), 3.0), (model.frozen.encoders.values(), 1.0)):
            for enc in encoders:
                assert isinstance(enc, VisionEncoder)
                n = sum(param_numel(p) for p in enc.parameters())
                t = self.image_tokens + int(enc.spec.num_prefix_tokens)
                layers, width = _tower_shape(enc.model.config)
                self.image_flops += passes * (2.0 * n * t + 4.0 * layers * width * t * t)
        self.image_flops += 6.0 * sum(param_numel(p) for p in core.projector.parameters()) * self.image_tokens
        llm: Any = core.llm  # a Hugging Face causal LM
        embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
        table_ids = {id(p) for p in embed.parameters()} | {id(p) for p in head.parameters()}
        self.llm_params = sum(param_numel(p) for p in llm.parameters() if id(p) not in table_ids)
        self.head_params = sum(param_numel(p) for p in head.parameters())
        self.llm_layers, self.llm_attn_width = _tower_shape(llm.config)

    def step_flops(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
        """Model FLOPs of these micro-batches (this rank's share of a step; sum over ranks for the step)."""
        from vla_scale.models.vla import cameras_per_sample, count_answer_tokens, prefix_tokens

        total = 0.0
        for mb in micro_batches:
            prefix = prefix_tokens(mb, self.image_tokens)
            lengths = mb["attention_mask"].sum(1).double() + prefix.double()  # LLM tokens per sample
            # Encoders and projector run once per camera image a sample has (the state token is the LLM's).
            total += float(cameras_per_sample(mb).sum()) * self.image_flops
            total += 6.0 * self.llm_params * float(lengths.sum())
            total += 12.0 * self.llm_layers * self.llm_attn_width * float((lengths * lengths).sum())
            total += 6.0 * self.head_params * int(count_answer_tokens(mb["labels"]))
        return total


class PhaseTimer:
    """Seconds per named phase of one step, each phase also a `torch.profiler` range (`vla_scale/<name>`).

    With `sync` on a CUDA device, the device is synchronized at both ends of every phase, so the times are
    the device's; without it (the default: no extra host syncs in training) they are the host's, which on a
    GPU is the time to enqueue the work, exact only for the phase that waits (a loss read back).
    """

    def __init__(self, device: "torch.device | str", sync: bool = False) -> None:
        self.device = torch.device(device)
        self.sync = sync and self.device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with torch.profiler.record_function(f"vla_scale/{name}"):
            if self.sync:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            try:
                yield
            finally:
                if self.sync:
                    torch.cuda.synchronize(self.device)
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# --------------------------------------------------------------------------- per-source loss


class PerSourceAccumulator:
    """Per-source token loss and accuracy over the micro-batches of one optimizer step.

    `add` takes per-sample tensors (all shape (B,), on the training device):
    the summed token loss of each sample, its number of loss tokens, its
    number of correctly predicted tokens, and its source index into
    `source_names`; optionally the number of its tokens that count for accuracy
    (`sample_choices`: for actions, the positions where the grammar leaves a
    choice; by default every loss token). Loss is per loss token, accuracy per
    counted token: forced characters and EOS would inflate an action accuracy. The sums stay on the device (index_add_, no host sync);
    `compute` reads them back once and returns
    `{"loss/<source>": mean token loss, "acc/<source>": token accuracy,
    "tokens/<source>": loss tokens}` for the sources that had tokens.

    With several ranks, pass `reduce` to `compute` (e.g. an in-place
    `torch.distributed.all_reduce` on the (3, S) sums) so every rank reports
    the global values. Source indices must lie in [0, len(source_names));
    they are checked only for CPU tensors (a check on CUDA would sync).
    """

    def __init__(self, source_names: Sequence[str]) -> None:
        if not source_names:
            raise ValueError("PerSourceAccumulator needs at least one source name")
        if len(set(source_names)) != len(source_names):
            raise ValueError(f"duplicate source names: {list(source_names)}")
        self.source_names = list(source_names)
        self._sums: torch.Tensor | None = None  # (4, S): loss, tokens, correct, counted for accuracy

    def reset(self) -> None:
        self._sums = None

    def add(
        self,
        sample_loss_sum: torch.Tensor,
        sample_tokens: torch.Tensor,
        sample_correct: torch.Tensor,
        source: torch.Tensor,
        sample_choices: torch.Tensor | None = None,
    ) -> None:
        n = len(self.source_names)
        source = source.detach().long().reshape(-1)
        if source.device.type == "cpu" and source.numel() and (source.min() < 0 or source.max() >= n):
            raise ValueError(f"source index out of range 0..{n - 1}: {source.tolist()}")
        device = source.device
        # float64 keeps token counts exact at any batch size; MPS has no float64.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        if self._sums is None:
            self._sums = torch.zeros(4, n, dtype=dtype, device=device)
        if sample_choices is None:  # every loss token counts for accuracy
            sample_choices = sample_tokens
        # detach: the loss tensor usually carries the autograd graph, which
        # must not be kept alive until the end of the step.
        values = torch.stack(
            [
                sample_loss_sum.detach().reshape(-1).to(self._sums),
                sample_tokens.detach().reshape(-1).to(self._sums),
                sample_correct.detach().reshape(-1).to(self._sums),
                sample_choices.detach().reshape(-1).to(self._sums),
            ]
        )
        self._sums.index_add_(1, source.to(self._sums.device), values)

    def compute(self, reduce: Callable[[torch.Tensor], Any] | None = None) -> dict[str, float]:
        """Per-source metrics of everything added since the last `reset`; one host sync."""
        if self._sums is None:
            return {}
        sums = self._sums
        if reduce is not None:
            sums = sums.clone()
            out = reduce(sums)
            if isinstance(out, torch.Tensor):  # functional reductions return the result
                sums = out
        loss, tokens, correct, counted = sums.cpu().tolist()
        result: dict[str, float] = {}
        for name, l, t, c, k in zip(self.source_names, loss, tokens, correct, counted):
            if t > 0:
                result[f"loss/{name}"] = l / t
                if k > 0:
                    result[f"acc/{name}"] = c / k
                result[f"tokens/{name}"] = t
        return result


# --------------------------------------------------------------------------- log file

_warned_no_tensorboard = False


class MetricsLogger:
    """Append-only metrics log of a run: `metrics.jsonl` plus TensorBoard scalars.

    Each `log(step, metrics)` writes one line
    `{"step": step, "time": <unix seconds>, **metrics}` and flushes it, so a
    crash of the process loses nothing already logged. NaN and infinities are
    written as `null` (JSON has no NaN). Only rank 0 writes; on other ranks
    every method is a no-op.

    Resume: call `truncate_after(resumed_step)` before logging again. Lines of
    steps after the checkpoint (logged before the crash, now to be redone) are
    dropped, so the file keeps one line per step; TensorBoard hides the same
    steps (`purge_step`). A fresh start in a run directory that already has a
    log calls `truncate_after(-1)`, which empties it. If the TensorBoard package is missing, a warning is
    given once and only the JSON file is written.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, tensorboard: bool = True, rank: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.rank = rank
        self._tensorboard = tensorboard
        self._writer: Any = None
        self._purge_step: int | None = None
        self._file = None
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            self._end_torn_line()

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.rank != 0:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.path} is closed")
        values = {key: _as_number(key, value) for key, value in metrics.items()}
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        writer = self._tensorboard_writer()
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(key, value, int(step))

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps > `step` (and a torn last line) from metrics.jsonl."""
        if self.rank != 0:
            return
        if self._file is not None:
            self._file.close()
        kept = [json.dumps(r, allow_nan=False) for r in read_metrics(self.path) if r.get("step", -1) <= step]
        write_bytes_atomic(self.path, "".join(line + "\n" for line in kept).encode("utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")
        # TensorBoard: hide events at steps > `step` written before the crash.
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1

    def _end_torn_line(self) -> None:
        # A crash mid-write leaves a last line without its newline; start on a
        # fresh line so the next record is not glued onto it (the torn line is
        # then skipped by read_metrics and dropped by truncate_after).
        if self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            self._file.write("\n")
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tensorboard_writer(self) -> Any:
        # Created on first use so that `truncate_after` can still pass purge_step.
        global _warned_no_tensorboard
        if not self._tensorboard or self._writer is not None:
            return self._writer
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            if not _warned_no_tensorboard:
                warnings.warn(
                    f"TensorBoard is not installed ({e}); metrics go to {self.path} only. "
                    "Install `tensorboard` or set train.tensorboard: false.",
                    stacklevel=3,
                )
                _warned_no_tensorboard = True
            self._tensorboard = False
            return None
        self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
        return self._writer


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of `<run_dir>/metrics.jsonl`), in file order.

    A line that is not valid JSON (a line torn by a crash mid-write) is
    skipped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: skipping a line that is not valid JSON", stacklevel=2)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _as_number(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {key!r} is a tensor of shape {tuple(value.shape)}, not a scalar")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from None
