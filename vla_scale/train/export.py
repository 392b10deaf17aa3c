"""Checkpoint -> inference folder (`vla-scale export`).

Rebuilds the model from the checkpoint's saved config (the frozen encoders
from their recorded sources, verified by content hash), loads the trained
weights, and writes an export folder (`vla_scale.models.export`).

Trained weights come from `model.safetensors` (single-process strategy) or,
for a DeepSpeed ZeRO-3 checkpoint, from DeepSpeed's own consolidation
(`zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`): the fp32 master
weights of every rank's partition, reassembled on the CPU of one process, no
process group needed. The export is then written in fp32 or bf16.

The frozen encoders are read again from the source folder recorded at
training time, or from `source` when that folder has moved; either way their
content hash must equal the checkpoint's.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from vla_scale.config import config_to_dict
from vla_scale.data.augment import inference_preprocessing
from vla_scale.errors import CheckpointError, ConfigError, ModelLoadError
from vla_scale.models.export import save_export
from vla_scale.models.loading import build_vla
from vla_scale.train.checkpoint import CheckpointManager
from vla_scale.train.deepspeed_strategy import deepspeed_tag, is_deepspeed_checkpoint
from vla_scale.train.distributed import prepare_deepspeed_env
from vla_scale.train.trainer import load_checkpoint_config, verify_frozen


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest complete one of a run or checkpoints folder."""
    if str(path).strip().lower() in ("", "auto", "none"):
        raise CheckpointError(f"checkpoint {path!r}: name a checkpoint folder or a run folder")
    return CheckpointManager(Path(path).parent).resolve(path, what="checkpoint")


def _load_zero_checkpoint(core: torch.nn.Module, ckpt_dir: Path) -> tuple[list[str], list[str]]:
    """Consolidate a ZeRO-3 checkpoint with DeepSpeed's zero_to_fp32 and load it into `core`."""
    prepare_deepspeed_env()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = deepspeed_tag(ckpt_dir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as e:  # DeepSpeed raises assorted types for unreadable shards
        raise CheckpointError(f"cannot consolidate the DeepSpeed checkpoint {ckpt_dir / tag}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    expected = core.state_dict()
    state = {k: v.to(expected[k].dtype) if k in expected else v for k, v in state.items()}
    missing, unexpected = core.load_state_dict(state, strict=False)
    return list(missing), list(unexpected)


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False,
                      source: str | Path | None = None) -> Path:
    """`source`: where the source VLM folder is now, when it moved since training (llava/paligemma)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_model

    ckpt_dir = resolve_checkpoint(ckpt)
    cfg = load_checkpoint_config(ckpt_dir)
    if source is not None:
        if cfg.model.source_type == "parts":
            raise ConfigError(f"{ckpt_dir}: --source applies to llava and paligemma sources; this run was built "
                              "from parts (model.llm and model.encoders.N.path)")
        cfg.model.source = str(source)
    if cfg.model.source_type != "parts" and not Path(cfg.model.source).is_dir():
        where = "--source" if source is not None else "the source VLM folder this checkpoint was trained from"
        raise ModelLoadError(f"{ckpt_dir}: {where} {cfg.model.source} does not exist (the frozen encoders are "
                             "read from it); pass --source DIR with its new location")
    model, _ = build_vla(cfg.model)
    if is_deepspeed_checkpoint(ckpt_dir):
        missing, unexpected = _load_zero_checkpoint(model.core, ckpt_dir)
    else:
        try:
            missing, unexpected = load_model(model.core, str(ckpt_dir / "model.safetensors"), strict=False)
        except Exception as e:
            raise CheckpointError(f"{ckpt_dir / 'model.safetensors'}: cannot read: "
                                  f"{str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: weights do not match the model ({sorted(missing)[:3]}, "
                              f"{sorted(unexpected)[:3]})")
    verify_frozen(model, cfg, json.loads((ckpt_dir / "frozen_encoders.json").read_text()), ckpt_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir / "tokenizer"), local_files_only=True)
    stats = json.loads((ckpt_dir / "action_stats.json").read_text())
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return save_export(model, tokenizer, stats, config_to_dict(cfg)["actions"], out, dtype=torch_dtype,
                       overwrite=force, config_yaml=OmegaConf.to_yaml(OmegaConf.structured(cfg)),
                       image_preprocessing=inference_preprocessing(cfg.data.augment),
                       inputs={"cameras": list(cfg.data.cameras), "state": cfg.data.state,
                               "state_bins": cfg.data.state_bins})
