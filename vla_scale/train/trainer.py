"""The training loop: one readable file, the same for every strategy.

    build model + tokenizer -> data -> strategy.setup -> (resume) ->
    for each step: loader.next_step() -> strategy.train_step() -> metrics
                   -> checkpoint every N steps (atomic) -> final checkpoint

The objective of a step is the same at any micro-batch size, accumulation and
world size: the summed answer-token loss of the global batch over its answer-token
count (counted from the labels before the backward passes; see
`vla_scale.train.strategy`). Per-source losses in the log follow the same rule,
and `acc/<source>` counts only the positions where the action grammar leaves a
choice. Every rank's slice of a batch holds the co-training mix in proportion
(`vla_scale.data.streaming_dataset`). With `train.val_every`, held-out sets are
validated (action error against the mean-action baseline, vision reliance;
`vla_scale.train.validation`) without touching the training state.

A checkpoint holds everything needed to continue exactly: the strategy's
files (trainable weights, optimizer, scheduler), the data-loader state, the
RNG states per rank, the resolved config, the action statistics, the
tokenizer and run metadata. The frozen encoders are not saved: their source
and a content hash are recorded, and resume/export verify the hash.

Several ranks (DeepSpeed ZeRO-3): every rank runs this loop; the strategy
gives the collectives. Rank 0 writes the shared checkpoint files, the config
and the metrics log; every rank writes its own RNG state and its part of the
strategy's files. Which checkpoint to resume from is decided by rank 0 and
broadcast, so all ranks load the same one. The data-loader state does not
depend on the world size (every rank draws the same global batch and takes
its slice), so a run resumes on a different number of ranks with the same
data order.

Preemption (`vla_scale.train.preemption`): on SIGUSR1/SIGTERM every rank
finishes its step, all agree by one all-reduce after each step, save that
step and leave the loop; under SLURM rank 0 then requeues the job. A run
whose latest checkpoint is already at `train.steps` returns before building
anything (the later jobs of a chain).

Throughput (every `train.log_every` steps, `perf/*` in metrics.jsonl): samples/s,
tokens/s in total and per device, MFU (`vla_scale.train.metrics` documents the
formula), the step-time breakdown averaged over the log window (`perf/time/data_s`,
forward, backward, optimizer, checkpoint, comm, other; forward/backward/optimizer/
comm are the strategy's, see `PhaseTimer`) and the peak memory of the busiest rank
(CUDA max allocated on GPU, peak RSS on CPU; the key says which). `step_callbacks`
are called with (step, StepResult) after every step (`vla-scale profile` steps
`torch.profiler` there).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vla_scale.actions.factory import make_action_tokenizer
from vla_scale.config import Config, config_from_dict, config_to_dict, save_config
from vla_scale.data.pipeline import build_data
from vla_scale.data.prompts import PromptBuilder
from vla_scale.errors import CheckpointError, ConfigError, TrainingError
from vla_scale.models.vla import VisionLanguageActionModel
from vla_scale.train.batching import resolve_accumulation
from vla_scale.train.checkpoint import (
    CheckpointManager,
    fsync_files,
    load_rng_state,
    read_metadata,
    restore_rng_state,
    rng_state_file,
    save_rng_state,
    write_json_atomic,
)
from vla_scale.train.distributed import HangWatchdog, resolve_hang_timeout
from vla_scale.train.metrics import (
    MetricsLogger,
    PerSourceAccumulator,
    ThroughputMeter,
    peak_flops_per_device,
    peak_memory,
)
from vla_scale.train.preemption import PreemptionWatch, SlurmJob, requeue_after_preemption
from vla_scale.train.strategies import make_strategy
from vla_scale.train.strategy import StepResult, Strategy

log = logging.getLogger(__name__)

# Config sections that must not change across a resume (they define the model and its outputs)...
_RESUME_LOCKED = ("model", "actions")
# ...except keys that change how, or from where, the same parameters are computed: hardware
# switches, planner-only architecture hints, and weight folders that moved (the frozen encoders
# are still verified by content hash; trained weights come from the checkpoint).
_RESUME_FREE = {"attn_implementation", "gradient_checkpointing", "fused_kernel", "precision", "arch", "llm_arch",
                "source", "llm", "tokenizer", "path"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def frozen_encoder_record(model: VisionLanguageActionModel, cfg: Config) -> dict[str, Any]:
    """Source and content hash of each frozen encoder (checkpoints store this instead of the weights)."""
    record = {}
    for name, enc in model.frozen.encoders.items():
        ec = next(e for e in cfg.model.encoders if e.name == name)
        h = hashlib.sha256()
        for key, tensor in sorted(enc.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        record[name] = {"source": ec.path or cfg.model.source, "sha256": h.hexdigest()}
    return record


def verify_frozen(model: VisionLanguageActionModel, cfg: Config, saved: dict[str, Any], where: Path) -> None:
    now = frozen_encoder_record(model, cfg)
    for name, rec in saved.items():
        if name not in now or now[name]["sha256"] != rec["sha256"]:
            found = now.get(name, {}).get("source", "nowhere")
            raise CheckpointError(f"{where}: frozen encoder '{name}' loaded from {found} is not the one this "
                                  f"checkpoint was trained with (from {rec['source']}; content hash differs)")


def check_resume_config(saved: dict[str, Any], cfg: Config, where: Path) -> None:
    now = config_to_dict(cfg)
    diffs = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix.rsplit(".", 1)[-1] in _RESUME_FREE:
            return
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{prefix}.{i}")
        elif isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        elif a != b:
            diffs.append(f"{prefix}: {a!r} -> {b!r}")

    for section in _RESUME_LOCKED:
        walk(saved.get(section), now.get(section), section)
    if diffs:
        raise ConfigError(f"cannot resume from {where}: the model config differs from the checkpoint's: "
                          + "; ".join(diffs))


@dataclass
class TrainResult:
    run_dir: Path
    last_checkpoint: Path | None
    losses: dict[int, float]
    final_step: int
    preempted: bool = False  # stopped early by SIGUSR1/SIGTERM, with a checkpoint (vla_scale.train.preemption)
    requeued: bool = False  # ...and the SLURM job was requeued to continue


class Trainer:
    def __init__(self, cfg: Config, strategy: Strategy | None = None):
        self.cfg = cfg
        self.strategy = strategy or make_strategy(cfg)
        self.run_dir = Path(cfg.run.output_dir)
        self.step_callbacks: list[Callable[[int, StepResult], None]] = []

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.model, self.tokenizer = self.strategy.build_model(cfg.model)
        self.action_tokenizer = make_action_tokenizer(cfg.actions, self.tokenizer)
        self.prompts = PromptBuilder(self.tokenizer, self.action_tokenizer, cfg.data.max_length)
        self.loader, self.stats = build_data(cfg, self.prompts, rank=self.strategy.rank,
                                             world_size=self.strategy.world_size)
        log.info("batch: global %d = micro-batch %d x accumulation %d x %d rank(s)", cfg.train.global_batch_size,
                 cfg.train.micro_batch_size, resolve_accumulation(cfg.train, self.strategy.world_size),
                 self.strategy.world_size)
        self.frozen_record = frozen_encoder_record(self.model, cfg)
        self.validator = None
        if cfg.train.val_every:
            from vla_scale.train.validation import Validator

            self.validator = Validator(cfg, self.prompts, self.stats, rank=self.strategy.rank)
        self.strategy.setup(self.model)

    def _write_checkpoint(self, ckpt: CheckpointManager, step: int, counters: dict[str, Any],
                          data_state: dict[str, Any] | None = None) -> Path:
        """Save step `step` (collective). `data_state`: the loader position to record, if not the current one."""
        def write(tmp: Path) -> None:
            self.strategy.save(tmp)  # collective: every rank writes (and flushes) its part
            rng_file = save_rng_state(tmp, self.strategy.rank)
            if self.strategy.is_main:
                write_json_atomic(tmp / "data_state.json",
                                  data_state if data_state is not None else self.loader.state_dict())
                save_config(self.cfg, tmp / "config.yaml")
                write_json_atomic(tmp / "action_stats.json", self.stats)
                write_json_atomic(tmp / "frozen_encoders.json", self.frozen_record)
                self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            else:
                # Rank 0 fsyncs the tree before COMPLETE, but on a network filesystem its fsync
                # cannot flush another node's client cache: each rank flushes what it wrote.
                fsync_files([rng_file])

        meta = {"step": step, **counters, "world_size": self.strategy.world_size,
                "strategy": self.cfg.train.strategy, "config": config_to_dict(self.cfg)}
        return ckpt.save(step, write, meta)

    def _resolve_resume(self, ckpt: CheckpointManager, spec: str) -> Path | None:
        """Rank 0 picks the checkpoint (warning about any fallback once); every rank gets its answer."""
        answer: tuple[str | None, str | None] = (None, None)
        if self.strategy.is_main:
            try:
                path = ckpt.resolve(spec)
                if path is None and spec not in ("auto", "none", ""):
                    raise CheckpointError(f"--resume {spec}: no checkpoint found")
                answer = (str(path) if path is not None else None, None)
            except CheckpointError as e:
                answer = (None, str(e))
        path, error = self.strategy.broadcast_object(answer)
        if error is not None:
            raise CheckpointError(error)
        return Path(path) if path is not None else None

    def _resume(self, ckpt: CheckpointManager, spec: str) -> tuple[int, dict[str, Any]]:
        path = self._resolve_resume(ckpt, spec)
        if path is None:
            return 0, {"samples": 0, "tokens": 0, "wall_time_s": 0.0}
        meta = read_metadata(path)
        check_resume_config(meta.get("config", {}), self.cfg, path)
        saved_strategy = meta.get("strategy", "single")
        if saved_strategy != self.cfg.train.strategy:
            raise CheckpointError(f"{path} was written by train.strategy={saved_strategy}; resume it with that "
                                  f"strategy (this run uses {self.cfg.train.strategy}), or export it and start a "
                                  "new run from the export")
        frozen = path / "frozen_encoders.json"
        if frozen.is_file():
            verify_frozen(self.model, self.cfg, json.loads(frozen.read_text()), path)
        self.strategy.load(path)
        self.loader.load_state_dict(json.loads((path / "data_state.json").read_text()))
        rank = self.strategy.rank
        if not rng_state_file(path, rank).is_file() and rank >= int(meta.get("world_size", 1)):
            # The world grew: new ranks have no RNG stream to continue. Fresh runs seed every rank
            # alike, so they take rank 0's state, as they would have at a fresh start.
            rank = 0
        restore_rng_state(load_rng_state(path, rank))
        log.info("resumed from %s at step %d", path, meta["step"])
        return int(meta["step"]), {k: meta.get(k, 0) for k in ("samples", "tokens", "wall_time_s")}

    def fit(self, resume: str = "auto", stop_after: int | None = None) -> TrainResult:
        """Train to `train.steps`; `stop_after=k` checkpoints at step k and returns (a planned preemption)."""
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        finished = self._finished_checkpoint() if resume == "auto" else None
        if finished is not None:  # a later job of a chain, or a requeue after the end: nothing to build or train
            log.warning("the run in %s is already finished (%s); nothing to train", self.run_dir, finished.name)
            return TrainResult(self.run_dir, finished, {}, t.steps)
        self._build()
        if self.strategy.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        ckpt = CheckpointManager(self.run_dir / "checkpoints", keep_last_k=t.keep_last_k,
                                 rank=self.strategy.rank, world_size=self.strategy.world_size,
                                 barrier=self.strategy.barrier, broadcast=self.strategy.broadcast_object)
        start, counters = self._resume(ckpt, resume)
        metrics = MetricsLogger(self.run_dir, tensorboard=t.tensorboard, rank=self.strategy.rank)
        metrics.truncate_after(start)
        per_source = PerSourceAccumulator(self.loader.source_names)
        meter = ThroughputMeter(warmup_steps=1, num_devices=self.strategy.world_size,
                                peak_flops_per_device=peak_flops_per_device(self.strategy.device, t.peak_flops))
        checkpoint_s = 0.0  # the last save's time, counted in the next step's interval
        shown_rate: float | None = None
        bar = None
        if t.progress and self.strategy.is_main and start < t.steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        losses: dict[int, float] = {}
        last_ckpt = ckpt.latest() if self.strategy.is_main else None
        last_ckpt = self.strategy.broadcast_object(str(last_ckpt) if last_ckpt else None)
        last_ckpt = Path(last_ckpt) if last_ckpt else None
        watchdog = HangWatchdog(resolve_hang_timeout(t.hang_timeout_s))
        slurm_job = SlurmJob.from_env()
        preemption = PreemptionWatch().install()  # SIGUSR1/SIGTERM: stop after the step, agreed by all ranks
        preempted = False
        wall0 = time.time() - float(counters.get("wall_time_s", 0.0))
        overlong = torch.zeros(2, dtype=torch.float64)  # truncated, dropped samples since the last log line
        meter.start()
        try:
            for step in range(start + 1, t.steps + 1):
                watchdog.arm()  # a step (with its checkpoint) that hangs becomes a traceback and an exit
                data_t0 = time.perf_counter()
                data_state = self.loader.state_dict()
                micro_batches = self.loader.next_step()
                data_s = time.perf_counter() - data_t0
                for mb in micro_batches:  # samples over data.max_length (data.overlong), counted per log line
                    overlong += torch.stack([mb["truncated"].sum(), mb["dropped"].sum()]).double()
                try:
                    result = self.strategy.train_step(micro_batches)
                except TrainingError:
                    # on_nonfinite=stop: the weights were not updated; save the state before this
                    # step (with the data position captured before it, so a resume retries this
                    # step) so the run can be inspected or resumed, then fail.
                    if step - 1 > start:
                        counters["wall_time_s"] = time.time() - wall0
                        self._write_checkpoint(ckpt, step - 1, counters, data_state=data_state)
                    raise
                counters["samples"] = int(counters.get("samples", 0)) + result.samples  # all ranks
                counters["tokens"] = int(counters.get("tokens", 0)) + result.tokens
                meter.step(result.samples, result.tokens, result.flops,
                           phases={"data": data_s, **result.phases, "checkpoint": checkpoint_s})
                checkpoint_s = 0.0
                for callback in self.step_callbacks:
                    callback(step, result)
                losses[step] = result.loss
                per_source.add(result.sample_loss_sum, result.sample_tokens, result.sample_correct, result.source,
                               result.sample_choices)
                val_row = self._validate(step, bar) if self._validation_due(step) else {}
                if step % t.log_every == 0 or step == t.steps or val_row:
                    truncated, dropped = self.strategy.all_reduce_sum(overlong.to(self.strategy.device)).tolist()
                    overlong.zero_()
                    row = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                           "skipped": float(result.skipped), "data/truncated": truncated, "data/dropped": dropped,
                           **per_source.compute(reduce=self.strategy.all_reduce_sum),
                           **{f"perf/{k}": v for k, v in meter.summary().items()}, **self._peak_memory(), **val_row}
                    per_source.reset()
                    if slurm_job is not None:
                        row["slurm/restart_count"] = slurm_job.restart_count
                    metrics.log(step, row)
                    shown_rate = row.get("perf/samples_per_s", shown_rate)  # for the progress bar
                    meter.reset()  # each line's perf/* covers the steps since the previous line
                if bar is not None:
                    rate = meter.summary().get("samples_per_s", shown_rate)
                    bar.set_postfix(loss=f"{result.loss:.4f}", **({"samples/s": f"{rate:.1f}"} if rate else {}))
                    bar.update(1)
                preempted = preemption.agreed(self.strategy.all_reduce_sum, self.strategy.device)
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or step in (t.steps, stop_after) \
                        or preempted:
                    counters["wall_time_s"] = time.time() - wall0
                    ckpt_t0 = time.perf_counter()
                    last_ckpt = self._write_checkpoint(ckpt, step, counters)
                    checkpoint_s = time.perf_counter() - ckpt_t0
                if step == stop_after or preempted:
                    break
        finally:
            watchdog.cancel()
            if bar is not None:
                bar.close()
            metrics.close()
            preemption.uninstall()
        final_step = max(losses, default=start)
        requeued = preempted and self.strategy.is_main and requeue_after_preemption(self.run_dir, final_step, t.steps)
        return TrainResult(self.run_dir, last_ckpt, losses, final_step, preempted, requeued)

    def _finished_checkpoint(self) -> Path | None:
        """The latest checkpoint if it is at `train.steps` or beyond (rank 0 reads, every rank gets the answer)."""
        found = None
        if self.strategy.is_main:
            latest = CheckpointManager(self.run_dir / "checkpoints").latest()
            if latest is not None and int(read_metadata(latest)["step"]) >= self.cfg.train.steps:
                found = str(latest)
        found = self.strategy.broadcast_object(found)
        return Path(found) if found is not None else None

    def _peak_memory(self) -> dict[str, float]:
        """`perf/<peak memory>_gib` of the rank with the most (collective: every rank calls it)."""
        name, gib = peak_memory(self.strategy.device)
        per_rank = torch.zeros(self.strategy.world_size, dtype=torch.float64, device=self.strategy.device)
        per_rank[self.strategy.rank] = gib
        return {f"perf/{name}": float(self.strategy.all_reduce_sum(per_rank).max())}

    def _validation_due(self, step: int) -> bool:
        every = self.cfg.train.val_every
        return bool(self.validator is not None and every and (step % every == 0 or step == self.cfg.train.steps))

    def _validate(self, step: int, bar: Any) -> dict[str, float]:
        """Held-out metrics (every rank computes them; rank 0 prints the line). Not counted in throughput."""
        from vla_scale.train.validation import format_validation

        assert self.validator is not None
        with self.strategy.full_model():
            row = self.validator.run(self.model, self.strategy.device)
        if self.strategy.is_main:
            line = format_validation(step, row)
            log.info("%s", line)
            if bar is not None:
                bar.write(line)
            elif self.cfg.train.progress:
                print(line, flush=True)
        return row


def load_checkpoint_config(ckpt_dir: Path) -> Config:
    meta_path = Path(ckpt_dir) / "metadata.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint: metadata.json is missing")
    return config_from_dict(json.loads(meta_path.read_text())["config"])
