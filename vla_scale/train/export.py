"""Checkpoint -> inference folder (`vla-scale export`).

Rebuilds the model from the checkpoint's saved config (the frozen encoders
from their recorded sources, verified by content hash), loads the trained
weights, and writes an export folder (`vla_scale.models.export`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vla_scale.config import config_to_dict
from vla_scale.errors import CheckpointError
from vla_scale.models.export import save_export
from vla_scale.models.loading import build_vla
from vla_scale.train.checkpoint import CheckpointManager
from vla_scale.train.trainer import load_checkpoint_config, verify_frozen


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if (p / "metadata.json").is_file():
        CheckpointManager(p.parent).verify(p)
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir():
            found = CheckpointManager(root).latest()
            if found is not None:
                return found
    raise CheckpointError(f"{p}: no complete checkpoint found (expected a checkpoint folder or a run folder)")


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False) -> Path:
    from omegaconf import OmegaConf
    from safetensors.torch import load_model

    ckpt_dir = resolve_checkpoint(ckpt)
    cfg = load_checkpoint_config(ckpt_dir)
    model, _ = build_vla(cfg.model)
    try:
        missing, unexpected = load_model(model.core, str(ckpt_dir / "model.safetensors"), strict=False)
    except Exception as e:
        raise CheckpointError(f"{ckpt_dir / 'model.safetensors'}: cannot read: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: weights do not match the model ({sorted(missing)[:3]}, "
                              f"{sorted(unexpected)[:3]})")
    verify_frozen(model, cfg, json.loads((ckpt_dir / "frozen_encoders.json").read_text()), ckpt_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir / "tokenizer"), local_files_only=True)
    stats = json.loads((ckpt_dir / "action_stats.json").read_text())
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return save_export(model, tokenizer, stats, config_to_dict(cfg)["actions"], out, dtype=torch_dtype,
                       overwrite=force, config_yaml=OmegaConf.to_yaml(OmegaConf.structured(cfg)))
