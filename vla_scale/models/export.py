"""Inference folders: write a trained VLA once, load it anywhere without its sources.

An export is a Hugging Face-style folder:
    model.safetensors      every weight (frozen encoders written once, here)
    vla_config.json        the architecture: encoder specs with their HF configs,
                           which encoders are frozen, projector, LLM config, the
                           sequence layout (the source family's), actions
    action_stats.json      the normalizer's statistics (q01/q99/mask)
    tokenizer files        the tokenizer with the prompt tokens added
    config.yaml            the training config, for provenance
vla_config.json's "image_preprocessing" says what the policy does to an image
before `to_pixels` (the centre crop of a model trained with augmentation).
Writing is atomic (a temporary folder renamed into place), and an existing
export is never overwritten unless asked to, so a failed export can never
damage a good one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_scale.errors import CheckpointError, ModelLoadError
from vla_scale.models.projector import Projector
from vla_scale.models.vision import EncoderSpec, VisionEncoder, vision_model_from_config
from vla_scale.models.vla import LAYOUTS, FrozenEncoders, VisionLanguageActionModel, VLACore

FORMAT = "vla-scale/1"
WEIGHTS = "model.safetensors"


def _no_init():
    try:
        from transformers.modeling_utils import no_init_weights

        return no_init_weights()
    except ImportError:  # moved in newer transformers; random init is only slower, not wrong
        return nullcontext()


def describe(model: VisionLanguageActionModel, actions: dict[str, Any]) -> dict[str, Any]:
    encoders = {**model.frozen.encoders, **model.core.encoders}
    return {
        "format": FORMAT,
        "image_size": model.image_size,
        "num_image_tokens": model.num_image_tokens,
        "encoders": [encoders[n].spec.to_dict() for n in model.core.encoder_order],
        "frozen_encoders": list(model.frozen.encoders.keys()),
        "projector": model.core.projector.describe(),
        "layout": model.core.layout.name,
        # The state projection's input width (data.state: projection); 0: none.
        "state_dim": 0 if model.core.state_projection is None else model.core.state_projection.in_features,
        "llm": model.core.llm.config.to_dict(),
        "actions": actions,
    }


def save_export(model: VisionLanguageActionModel, tokenizer: Any, stats: dict, actions: dict[str, Any],
                out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, overwrite: bool = False,
                config_yaml: str | None = None,
                state_dict: dict[str, torch.Tensor] | None = None,
                image_preprocessing: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"export folder {out} already exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = state_dict if state_dict is not None else model.state_dict()
        seen: dict[int, str] = {}
        tensors, tied = {}, {}
        for k, v in state.items():
            ptr = v.data_ptr()
            if ptr in seen and v.numel() and v.shape == state[seen[ptr]].shape:
                tied[k] = seen[ptr]  # e.g. tied input/output embeddings: stored once
                continue
            seen[ptr] = k
            tensors[k] = v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "vla_scale": FORMAT})
        config = describe(model, actions)
        config["tied_weights"] = tied
        config["image_preprocessing"] = image_preprocessing or {"center_crop_scale": None}
        # What the policy must feed besides the instruction: cameras in prefix order, the state's mode.
        config["inputs"] = inputs or {"cameras": ["primary"], "state": "none", "state_bins": 256}
        config["dtype"] = str(dtype).replace("torch.", "")
        (tmp / "vla_config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "action_stats.json").write_text(json.dumps(stats, indent=2))
        tokenizer.save_pretrained(str(tmp))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_export(folder: str | os.PathLike, attn_implementation: str = "sdpa"):
    """(model, tokenizer, stats, config dict) from an export folder, built from its own configs."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    cfg_path = folder / "vla_config.json"
    if not cfg_path.is_file() or not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder} is not a vla-scale export: vla_config.json or {WEIGHTS} is missing")
    try:
        config = json.loads(cfg_path.read_text())
        stats = json.loads((folder / "action_stats.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: cannot read the export's metadata: {e}") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: unknown format {config.get('format')!r} (expected {FORMAT})")
    with _no_init():
        encoders = []
        for spec in config["encoders"]:
            spec = EncoderSpec(**spec)
            encoders.append(VisionEncoder(vision_model_from_config(spec.hf_config), spec))
        llm_cfg = dict(config["llm"])
        llm_config = AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg)
        llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn_implementation)
        p = config["projector"]
        projector = Projector(p["in_dims"], p["dims"], p["activation"], p["post_scale"])
    frozen_names = set(config["frozen_encoders"])
    frozen = FrozenEncoders([e for e in encoders if e.spec.name in frozen_names])
    layout = config.get("layout", "llava")  # exports written before layouts were recorded were all LLaVA-style
    if layout not in LAYOUTS:
        raise CheckpointError(f"{cfg_path}: unknown sequence layout {layout!r} (expected one of {sorted(LAYOUTS)})")
    core = VLACore([e for e in encoders if e.spec.name not in frozen_names], projector, llm,
                   [e.spec.name for e in encoders], LAYOUTS[layout])
    for e in core.encoders.values():
        e.requires_grad_(True)
    if config.get("state_dim"):
        core.attach_state_projection(int(config["state_dim"]))
    model = VisionLanguageActionModel(frozen, core, config["image_size"], config["num_image_tokens"])
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{folder / WEIGHTS} is corrupt: {str(e).splitlines()[0]}") from None
    for alias, key in config.get("tied_weights", {}).items():
        state[alias] = state[key]
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS} does not match vla_config.json: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if hasattr(llm, "tie_weights") and getattr(llm.config, "tie_word_embeddings", False):
        llm.tie_weights()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of export {folder}: {str(e).splitlines()[0]}") from None
    return model.eval(), tokenizer, stats, config
