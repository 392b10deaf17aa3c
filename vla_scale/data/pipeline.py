"""From configured sources to this rank's micro-batches for one optimizer step.

`CoTrainingLoader` is the seam the trainer sees: `next_step()` returns the
micro-batches (collated tensors) this rank processes for one optimizer step,
and `state_dict()`/`load_state_dict()` make resume continue at exactly the
next sample. Sources are the built-in synthetic set for now; streaming MDS
shards plug in behind the same seam.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_scale.actions import ActionNormalizer
from vla_scale.config.schema import Config
from vla_scale.data.images import to_pixels
from vla_scale.data.mixture import CoTrainingMixture
from vla_scale.data.prompts import PromptBuilder
from vla_scale.data.synthetic import make_samples
from vla_scale.errors import DataError
from vla_scale.models.vla import IGNORE_INDEX

log = logging.getLogger(__name__)


def load_source_samples(cfg: Config) -> list[list[dict[str, Any]]]:
    out = []
    for i, src in enumerate(cfg.data.sources):
        if src.path != "synthetic":
            raise DataError(f"data.sources.{i}.path={src.path!r}: only the built-in 'synthetic' source is "
                            "available in this version (streaming shards come next)")
        out.append(make_samples(src.task, cfg.data.synthetic.samples_per_source, seed=cfg.train.seed + i,
                                image_size=cfg.data.synthetic.image_size, action_dim=cfg.actions.dim,
                                chunk=cfg.actions.chunk))
    return out


def robot_actions(samples_per_source: list[list[dict[str, Any]]], dim: int) -> np.ndarray:
    acts = [np.asarray(s["action"], dtype=np.float32).reshape(-1, dim)
            for samples in samples_per_source for s in samples if s["task"] == "robot"]
    if not acts:
        raise DataError("no robot samples: action statistics need at least one robot source")
    return np.concatenate(acts, axis=0)


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids (pad_id), labels (-100) and attention masks; stack pixels."""
    longest = max(len(s["input_ids"]) for s in samples)
    b = len(samples)
    ids = torch.full((b, longest), pad_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    return {"pixel_values": torch.stack([s["pixels"] for s in samples]), "input_ids": ids,
            "attention_mask": mask, "labels": labels, "source": torch.tensor([s["source"] for s in samples])}


def load_stats(cfg: Config, samples: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Action statistics: from `data.stats` when given, else computed from the robot sources."""
    if cfg.data.stats:
        p = Path(cfg.data.stats)
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"data.stats: cannot read {p}: {e}") from None
    keep = set(cfg.actions.keep_dims)
    mask = [i not in keep for i in range(cfg.actions.dim)]
    return ActionNormalizer.from_actions(robot_actions(samples, cfg.actions.dim), mask=mask).to_stats()


def build_data(cfg: Config, prompts: PromptBuilder, rank: int = 0,
               world_size: int = 1) -> tuple["CoTrainingLoader", dict[str, Any]]:
    """The loader for this rank and the action statistics it normalises with."""
    samples = load_source_samples(cfg)
    stats = load_stats(cfg, samples)
    loader = CoTrainingLoader(cfg, prompts, ActionNormalizer.from_stats(stats), samples, rank, world_size)
    return loader, stats


class CoTrainingLoader:
    def __init__(self, cfg: Config, prompt_builder: PromptBuilder, normalizer: Any,
                 samples_per_source: list[list[dict[str, Any]]], rank: int = 0, world_size: int = 1):
        t = cfg.train
        if t.global_batch_size % (t.micro_batch_size * world_size):
            raise DataError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                            f"micro_batch_size x world_size = {t.micro_batch_size} x {world_size}")
        self.cfg = cfg
        self.prompts = prompt_builder
        self.normalizer = normalizer
        self.samples = samples_per_source
        self.rank, self.world_size = rank, world_size
        self.source_names = [s.name for s in cfg.data.sources]
        self.mixture = CoTrainingMixture(self.source_names, [len(s) for s in samples_per_source],
                                         [s.weight for s in cfg.data.sources], t.global_batch_size, seed=t.seed)
        self.micro_batches = t.global_batch_size // (t.micro_batch_size * world_size)

    def _prepare(self, source: int, index: int) -> dict[str, Any]:
        s = self.samples[source][index]
        if s["task"] == "robot":
            action = np.asarray(s["action"], dtype=np.float32)
            if not np.all(np.isfinite(action)):
                raise DataError(f"source '{self.source_names[source]}' sample {index}: non-finite action {action}")
            tok = self.prompts.build_robot(s["instruction"], self.normalizer.normalize(action))
        else:
            tok = self.prompts.build_vl(s["question"], s["answer"])
        return {"input_ids": tok.input_ids, "labels": tok.labels, "source": source,
                "pixels": to_pixels(s["image"], self.cfg.model.image_size)}

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        picks = self.mixture.next_batch()
        per_rank = len(picks) // self.world_size
        mine = picks[self.rank * per_rank:(self.rank + 1) * per_rank]
        mb = self.cfg.train.micro_batch_size
        pad = self.prompts.tokenizer.pad_token_id
        return [collate([self._prepare(s, i) for s, i in mine[k:k + mb]], pad) for k in range(0, len(mine), mb)]

    def state_dict(self) -> dict:
        return {"mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.mixture.load_state_dict(state["mixture"])
        except (KeyError, ValueError) as e:
            raise DataError(f"cannot resume the data loader: {e}") from None
