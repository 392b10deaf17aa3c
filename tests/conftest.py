"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit runs (see MACHINE.md), so
it is set here, at the very top, when no GPU is present. Tests build every
model and tokenizer they use locally; nothing reaches a model hub.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA-family source VLM (SigLIP + 2-layer projector + Llama) on disk."""
    from vla_scale.models.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("src") / "llava")


@pytest.fixture(scope="session")
def tiny_llava_clip(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5-style source VLM: CLIP tower (CLS dropped) + 2-layer projector + Llama."""
    from vla_scale.models.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("src") / "llava_clip", tower="clip")


@pytest.fixture(scope="session")
def tiny_paligemma(tmp_path_factory) -> Path:
    from vla_scale.models.tiny import build_tiny_paligemma

    return build_tiny_paligemma(tmp_path_factory.mktemp("src") / "paligemma")


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory) -> dict:
    from vla_scale.models.tiny import build_tiny_parts

    return build_tiny_parts(tmp_path_factory.mktemp("src") / "parts")


REPO = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO / "configs" / "tiny.yaml"


@pytest.fixture
def tiny_config(tiny_llava, tmp_path):
    """The tiny preset pointed at the session's tiny source VLM and a fresh run folder."""
    from vla_scale.config import load_config

    def make(*overrides: str):
        return load_config(TINY_PRESET, [f"model.source={tiny_llava}", f"run.output_dir={tmp_path / 'run'}",
                                         "train.progress=false", "train.tensorboard=false", "train.warmup_steps=1", *overrides])

    return make
