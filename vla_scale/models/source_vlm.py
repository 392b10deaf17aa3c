"""Save a VLA trained as a VLM back as a source VLM folder (LLaVA layout), like any pretrained VLM.

The demo first teaches its tiny, randomly initialised source VLM about the
simulator's scenes (captions, questions, points), so that the paper's
premise holds in miniature: the frozen encoder copy of the VLA then keeps
features that mean something. That stage trains with the project's own
trainer, on a VLA with ONE trainable copy of the source tower and the
source's projector (`projector.init: source`), on vision-language data
only. `save_source_vlm` writes the result where `model.source` can read it:
the source's `LlavaForConditionalGeneration` with the trained tower,
projector and LLM loaded into it, `save_pretrained`, the tokenizer (with
the prompt tokens the VLA added) and the image processor files.

Tower layers the VLA trimmed away (after its feature layer; SigLIP's
pooling head) are never used by a LLaVA-style VLM either; they keep the
source's values.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vla_scale.errors import ModelLoadError

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "chat_template.jinja")


@torch.no_grad()
def save_source_vlm(vla: Any, tokenizer: Any, source: str | Path, out: str | Path) -> Path:
    """Write `vla` (one trainable encoder copied from the LLaVA folder `source`, projector from the source)
    as a LLaVA folder at `out` (atomically; an existing `out` is replaced)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from vla_scale.models.loading import _take_apart

    source, out = Path(source), Path(out)
    cfg = AutoConfig.from_pretrained(str(source), local_files_only=True)
    if cfg.model_type != "llava":
        raise ModelLoadError(f"save_source_vlm writes LLaVA folders; {source} is a {cfg.model_type!r} model")
    core = vla.core
    if len(core.encoder_order) != 1 or len(core.encoders) != 1 or len(vla.frozen.encoders) != 0:
        raise ModelLoadError(f"save_source_vlm needs a VLA with exactly one (trainable) encoder, got "
                             f"{core.encoder_order} ({len(vla.frozen.encoders)} frozen)")
    encoder = next(iter(core.encoders.values()))
    m = LlavaForConditionalGeneration.from_pretrained(str(source), local_files_only=True, dtype=torch.float32)
    rows = core.llm.get_input_embeddings().weight.shape[0]  # the VLA's (grown by its prompt tokens, padded)
    if rows != m.get_input_embeddings().weight.shape[0]:
        m.resize_token_embeddings(rows, mean_resizing=False)  # before taking apart: it replaces the head
    tower, proj, decoder, head = _take_apart(m)
    linears = [proj.linear_1, proj.linear_2]
    layers = list(core.projector.layers)
    if [tuple(l.weight.shape) for l in layers] != [tuple(l.weight.shape) for l in linears]:
        raise ModelLoadError(f"the VLA's projector {[tuple(l.weight.shape) for l in layers]} does not have the "
                             f"source's shape {[tuple(l.weight.shape) for l in linears]} (use projector.init: source)")
    result = tower.load_state_dict(encoder.model.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ModelLoadError(f"the VLA's encoder does not fit the source tower: {result.unexpected_keys[:3]}")
    for mine, theirs in zip(layers, linears):
        theirs.weight.copy_(mine.weight)
        theirs.bias.copy_(mine.bias)
    decoder.load_state_dict(core.llm.model.state_dict())
    head.load_state_dict(core.llm.lm_head.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        m.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for name in PROCESSOR_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
