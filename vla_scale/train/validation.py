"""Validation on held-out data: does the policy act well, and does it look at the image?

The training loss cannot tell a policy that reads the image from one that has
learned the average action for each instruction: both reach similar losses
(measured on a simulated suite: 0.52 against 0.47, with 0/15 against 7/15
successes). So every `train.val_every` steps, on the held-out sets of
`data.val_sources` (read once, no augmentation), `Validator.run` reports:

- `val/loss/<source>`: the answer-token mean loss of each source (the training rule);
- robot sources, from constrained greedy decoding (what the policy does), in
  normalised units ([-1, 1] per dimension):
  `val/l1/<source>` (mean over the continuous dimensions) and
  `val/l1/<source>/d<k>` per dimension, beside `val/l1_baseline/<source>`
  (always predicting the training set's mean action); `val/gripper_acc/<source>`
  over the kept-raw (0/1) dimensions beside `val/gripper_acc_baseline/<source>`
  (always the majority value);
- vision reliance: the same loss and L1 with each sample's image swapped for
  the image of another validation sample (`partners`: a quarter, half or three
  quarters of the set away, whichever image differs most) (`val/loss_shuffled/...`,
  `val/l1_shuffled/...`) and the gaps `val/reliance/<source>/loss_gap`,
  `.../l1_gap` (shuffled minus true). A policy that ignores the image shows no gap.

The `data.val_samples` samples of a set are spread evenly over the whole set
(not its first samples): robot data is stored episode by episode, so the first
128 samples were the first two episodes, and a sample's neighbour is the next
step of the same episode, whose image is nearly the same. Swapping images with
neighbours measured a gap of 0.000 for any policy; a quarter, half or three
quarters of the set away is another episode (or, with one episode, another
phase of it), and of those the most different image, so that a swap never lands
on the same scene by chance.

Every rank runs the same validation (the model is gathered for it under
ZeRO-3, see `Strategy.full_model`), so the numbers are identical on all
ranks and rank 0 logs them. Validation never changes the model, the data
order or any random state: a run with validation trains exactly as one without.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_scale.actions import ActionNormalizer
from vla_scale.config.schema import Config
from vla_scale.data.augment import inference_preprocessing
from vla_scale.data.pipeline import SampleProcessor, collate, write_synthetic_source
from vla_scale.data.prompts import PromptBuilder
from vla_scale.data.schema import ROBOT_TASK
from vla_scale.data.storage import ShardLocation, resolve_source
from vla_scale.data.streaming_compat import import_streaming
from vla_scale.errors import DataError
from vla_scale.models.vla import IGNORE_INDEX, VisionLanguageActionModel
from vla_scale.policy.decoding import decode_actions


def validation_dirs(cfg: Config, rank: int = 0) -> list[Path | ShardLocation]:
    """The shard folder of every validation source (synthetic held-out sets are written by rank 0)."""
    from vla_scale.data.pipeline import _wait_for

    index = {s.name: i for i, s in enumerate(cfg.data.sources)}
    dirs = []
    for k, v in enumerate(cfg.data.val_sources):
        if v.path == "synthetic":
            d = Path(cfg.run.output_dir) / "data" / f"val_{v.name}"
            if rank == 0 and not (d / "index.json").is_file():
                write_synthetic_source(cfg, index[v.name], d, held_out=True)
            _wait_for(d / "index.json", f"held-out synthetic source '{v.name}'")
        else:  # a local folder or a URL (read through the shard cache, like training sources)
            st = cfg.data.storage
            d = resolve_source(v.path, name=f"val_{v.name}", cache_dir=st.cache_dir, timeout=st.download_timeout_s,
                               what=f"data.val_sources.{k}.path")
        dirs.append(d)
    return dirs


def _read(folder: Path | ShardLocation, limit: int, chunk: int = 1) -> list[dict[str, Any]]:
    streaming = import_streaming()
    remote, local = (folder.remote, folder.local) if isinstance(folder, ShardLocation) else (None, folder)
    if chunk > 1:  # per-step robot rows become (T, D) chunks as in training (vla_scale.data.chunks)
        from vla_scale.data.chunks import ChunkedCoTrainingDataset

        ds = ChunkedCoTrainingDataset(remote=remote, local=str(local), shuffle=False, batch_size=1, chunk=chunk,
                                      batching_method="random")
    else:
        ds = streaming.StreamingDataset(remote=remote, local=str(local), shuffle=False, batch_size=1)
    try:
        # num_samples, not len(): under several ranks len() is one rank's share of an epoch.
        n = int(ds.num_samples)
        return [ds[int(i)] for i in spread(n, limit)]
    finally:
        del ds
        gc.collect()


def spread(n: int, limit: int) -> list[int]:
    """`min(n, limit)` indices of [0, n) spread evenly over it, in order (all of them when n <= limit)."""
    if n <= limit:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, limit).round().astype(np.int64)]


def partner(i: int, n: int) -> int:
    """The sample half the set away: with robot data stored episode by episode and read spread over it,
    one from another episode at about the same phase of its task."""
    return (i + max(1, n // 2)) % n


def partners(pixels: torch.Tensor) -> list[int]:
    """For each of the n images (n, ...), the one it is swapped with in the reliance check: of the samples a
    half, a quarter and three quarters of the set away (other episodes, about the same phase of the task),
    the one whose image differs most from its own (mean absolute pixel difference; ties: half the set away).

    Half the set away alone can land on the same scene: with the demo's four held-out episodes on spots
    2, 1, 2, 1, every sample got an image of its own spot and the gap read +0.001 for a policy that follows
    the image (BENCHMARKS.md 9h). A same-scene swap says nothing about whether the policy looks."""
    n = pixels.shape[0]
    flat = pixels.reshape(n, -1).float()
    out = []
    for i in range(n):
        cands = list(dict.fromkeys(c for c in (partner(i, n), (i + n // 4) % n, (i + 3 * n // 4) % n) if c != i))
        if not cands:
            out.append(i)
            continue
        diff = [float((flat[c] - flat[i]).abs().mean()) for c in cands]
        out.append(cands[max(range(len(cands)), key=lambda k: (diff[k], -k))])
    return out


def _answer_start(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


class Validator:
    """Held-out batches built once; `run(model)` evaluates them (see the module docstring)."""

    def __init__(self, cfg: Config, prompts: PromptBuilder, stats: dict[str, dict[str, Any]], rank: int = 0):
        self.cfg = cfg
        self.prompts = prompts
        task = {s.name: s.task for s in cfg.data.sources}
        names = [v.name for v in cfg.data.val_sources]
        if len(set(names)) != len(names):
            raise DataError(f"data.val_sources: one validation set per training source, got {names}")
        self.names = names
        self.tasks = {n: task[n] for n in names}
        processor = SampleProcessor(cfg, prompts, stats, names)
        # Validation sees what the exported policy sees: no random augmentation, and the centre crop
        # the export records when training augmented.
        processor.augment = False
        processor.center_crop_scale = inference_preprocessing(cfg.data.augment)["center_crop_scale"]
        self.batches: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.samples: dict[str, list[dict[str, Any]]] = {}
        micro = cfg.train.micro_batch_size
        for k, (name, folder) in enumerate(zip(names, validation_dirs(cfg, rank))):
            raw = _read(folder, cfg.data.val_samples, cfg.actions.chunk)
            if not raw:
                raise DataError(f"data.val_sources.{k} ('{name}'): {folder} holds no samples")
            processed = [processor.sample({**s, "_stream": k, "_uid": i, "_epoch": 0}) for i, s in enumerate(raw)]
            self.samples[name] = processed
            pad = prompts.tokenizer.pad_token_id
            self.batches[name] = [collate(processed[i:i + micro], pad) for i in range(0, len(processed), micro)]
        robot = [n for n in names if self.tasks[n] == ROBOT_TASK]
        # The reliance check's image swaps, fixed for the run (the held-out images never change).
        self.pairs = {n: partners(torch.stack([s["pixels"] for s in self.samples[n]])) for n in robot}
        self.normalizers = {n: ActionNormalizer.from_stats(stats[n]) for n in robot}
        self.mean_action = {n: np.asarray(self.normalizers[n].normalize(np.asarray(stats[n]["mean"], np.float64)))
                            for n in robot}
        chunk = cfg.actions.chunk
        self.chunk = chunk if chunk > 1 else None
        self.grammar = prompts.action_tokenizer.grammar(prompts.tokenizer.eos_token_id, chunk=self.chunk)
        # The held-out actions as the model is asked to write them (decoded from their label tokens), once.
        decode, d = prompts.action_tokenizer.decode, cfg.actions.dim
        self.targets = {n: np.asarray([decode(s["input_ids"][_answer_start(s["labels"]):], chunk=self.chunk)
                                       for s in self.samples[n]], np.float64).reshape(len(self.samples[n]), -1, d)
                        for n in robot}

    # -------------------------------------------------------------- evaluation

    def _loss(self, model: VisionLanguageActionModel, batches, device, pairs: list[int] | None = None) -> float:
        loss_sum, tokens = 0.0, 0.0
        pixels = [b["pixel_values"] for b in batches]
        if pairs is not None:  # each sample gets its partner's image (`partners`)
            flat = torch.cat(pixels)
            flat = flat[pairs]
            pixels = list(torch.split(flat, [p.shape[0] for p in pixels]))
        for batch, px in zip(batches, pixels):
            dev = {k: v.to(device) for k, v in batch.items()}
            dev["pixel_values"] = px.to(device)
            out = model(dev)
            loss_sum += float(out.sample_loss_sum.sum())
            tokens += float(out.sample_tokens.sum())
        return loss_sum / max(tokens, 1.0)

    def _predict(self, model, name: str, device, pairs: list[int] | None = None) -> np.ndarray:
        """Decoded normalised actions (N, T, D) for a held-out set, micro-batch by micro-batch, through
        the policy's batched decoder; `pairs`: each sample with its partner's image (`partners`)."""
        samples = self.samples[name]
        n, micro, out = len(samples), self.cfg.train.micro_batch_size, []
        for k in range(0, n, micro):
            rows = samples[k:k + micro]
            images = [samples[pairs[k + i]]["pixels"] if pairs is not None else s["pixels"] for i, s in enumerate(rows)]
            prompts = [s["input_ids"][:_answer_start(s["labels"])] for s in rows]
            state = torch.stack([s["state"] for s in rows]).to(device) if "state" in rows[0] else None
            result = decode_actions(model, torch.stack(images).to(device), prompts, self.grammar, state=state)
            out += [self.prompts.action_tokenizer.decode(r.ids, chunk=self.chunk) for r in result.rows]
        return np.asarray(out, np.float64).reshape(n, -1, self.cfg.actions.dim)

    @torch.no_grad()
    def run(self, model: VisionLanguageActionModel, device: torch.device) -> dict[str, float]:
        core = model.core
        was_training = core.training
        core.eval()
        row: dict[str, float] = {}
        try:
            for name in self.names:
                batches = self.batches[name]
                row[f"val/loss/{name}"] = self._loss(model, batches, device)
                if self.tasks[name] != ROBOT_TASK:
                    continue
                row[f"val/loss_shuffled/{name}"] = self._loss(model, batches, device, pairs=self.pairs[name])
                cont = self.normalizers[name].mask  # True: a normalised (continuous) dimension
                grip = ~cont
                target = self.targets[name]
                pred = self._predict(model, name, device)
                pred_s = self._predict(model, name, device, pairs=self.pairs[name])
                mean = self.mean_action[name]
                if cont.any():
                    per_dim = np.abs(pred - target).mean(axis=(0, 1))
                    for k in np.flatnonzero(cont):
                        row[f"val/l1/{name}/d{k}"] = float(per_dim[k])
                    row[f"val/l1/{name}"] = float(per_dim[cont].mean())
                    row[f"val/l1_baseline/{name}"] = float(np.abs(mean[None, None] - target)[..., cont].mean())
                    row[f"val/l1_shuffled/{name}"] = float(np.abs(pred_s - target)[..., cont].mean())
                    row[f"val/reliance/{name}/l1_gap"] = row[f"val/l1_shuffled/{name}"] - row[f"val/l1/{name}"]
                if grip.any():
                    t = target[..., grip] > 0.5
                    row[f"val/gripper_acc/{name}"] = float(((pred[..., grip] > 0.5) == t).mean())
                    majority = t.mean() >= 0.5
                    row[f"val/gripper_acc_baseline/{name}"] = float((t == majority).mean())
                    row[f"val/gripper_acc_shuffled/{name}"] = float(((pred_s[..., grip] > 0.5) == t).mean())
                row[f"val/reliance/{name}/loss_gap"] = row[f"val/loss_shuffled/{name}"] - row[f"val/loss/{name}"]
        finally:
            core.train(was_training)
        return row


def format_validation(step: int, row: dict[str, float]) -> str:
    """One line for the log and the demo: losses, action error against the baseline, and the reliance gap."""
    losses = {k.split("/", 2)[2]: v for k, v in row.items() if k.startswith("val/loss/")}
    parts = [f"val @ step {step}: loss " + ", ".join(f"{n} {v:.3f}" for n, v in losses.items())]
    for name in losses:
        if f"val/l1/{name}" in row:
            parts.append(f"{name}: action L1 {row[f'val/l1/{name}']:.3f} "
                         f"(mean-action {row[f'val/l1_baseline/{name}']:.3f})")
        if f"val/gripper_acc/{name}" in row:
            parts.append(f"gripper {row[f'val/gripper_acc/{name}']:.0%} "
                         f"(majority {row[f'val/gripper_acc_baseline/{name}']:.0%})")
        if f"val/reliance/{name}/loss_gap" in row:
            gap = f"vision reliance (shuffled images): loss {row[f'val/reliance/{name}/loss_gap']:+.3f}"
            if f"val/reliance/{name}/l1_gap" in row:
                gap += f", L1 {row[f'val/reliance/{name}/l1_gap']:+.3f}"
            parts.append(gap)
    return "; ".join(parts)
