"""One vision encoder: a Hugging Face vision model plus how its features are read.

A `VisionEncoder` takes images as float tensors in [0, 1] (B, 3, H, W), applies
its own normalisation (each pretrained encoder has its own mean/std), runs the
model and returns per-patch features (B, P, D) from the configured layer.
Images of another size than the model was built for get interpolated
position embeddings, as Hugging Face's towers do (`interpolate_pos_encoding`;
DINOv2 always interpolates); at the native size nothing changes. It
never decides whether it is trained: freezing is the caller's business
(`vla_scale.models.vla.FrozenEncoders`).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from vla_scale.errors import ModelLoadError

# Normalisation used when a folder has no preprocessor_config.json.
_DEFAULT_STATS = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "dinov2_with_registers": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


@dataclass
class EncoderSpec:
    """Everything needed to rebuild an encoder without its source folder (saved in exports)."""

    name: str
    trainable: bool
    feature_layer: int
    post_layernorm: bool
    num_prefix_tokens: int  # tokens dropped before the patch tokens (CLS, registers); 0 keeps all
    image_mean: list[float]
    image_std: list[float]
    hf_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class VisionEncoder(nn.Module):
    """Construction trims what the features never use (see `trim_to_features`) and records it in `spec`."""

    def __init__(self, model: nn.Module, spec: EncoderSpec):
        super().__init__()
        n_states = _num_layers(model) + 1  # embeddings + every layer
        if not -n_states <= spec.feature_layer < n_states:
            raise ModelLoadError(
                f"encoder '{spec.name}': feature_layer {spec.feature_layer} is outside the model's "
                f"{n_states} hidden states (-{n_states}..{n_states - 1})"
            )
        self.spec = trim_to_features(model, spec)
        self.model = model
        # Non-persistent: the statistics are part of the spec, not of the weights.
        self.register_buffer("mean", torch.tensor(spec.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def num_patches(self, image_size: int) -> int:
        patch = int(self.model.config.patch_size)
        return (image_size // patch) ** 2

    @property
    def native_size(self) -> int | None:
        size = getattr(self.model.config, "image_size", None)
        return int(size) if size else None

    @property
    def can_resize(self) -> bool:
        """Whether the tower takes other image sizes (by interpolating its position embeddings)."""
        if self.model.config.model_type.startswith("dinov2"):
            return True
        return "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (B, 3, H, W) as loaded, or floats in [0, 1]."""
        dtype = next(self.model.parameters()).dtype
        x = images.to(self.mean.dtype)
        if images.dtype == torch.uint8:
            x = x / 255.0
        x = ((x - self.mean) / self.std).to(dtype)
        kwargs = {}
        if self.native_size not in (None, x.shape[-1]) and not self.model.config.model_type.startswith("dinov2"):
            # Only off the native size: there the embeddings are used as they are, exactly.
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=x, output_hidden_states=True, **kwargs)
        h = out.hidden_states[self.spec.feature_layer]
        if self.spec.post_layernorm:
            h = _post_layernorm(self.model)(h)
        return h[:, self.spec.num_prefix_tokens:]


def _layer_list(model: nn.Module) -> nn.ModuleList | None:
    n = _num_layers(model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    return None


def trim_to_features(model: nn.Module, spec: EncoderSpec) -> EncoderSpec:
    """Remove what never contributes to the features, in place; returns the spec that describes the result.

    - layers after the one whose output is read (feature_layer -2 drops the last layer, as
      Prismatic does): a trained copy would otherwise carry optimizer state for weights that
      never get a gradient, and a frozen one would compute them for nothing;
    - SigLIP's attention-pooling head (it reads the last layer, which the VLA does not use);
    - the final layer norm when `post_layernorm` is false (replaced by identity).
    Idempotent: a trimmed encoder (feature_layer -1) is left as it is, so exports rebuilt from
    the returned spec's `hf_config` come out identical.
    """
    from dataclasses import replace

    n = _num_layers(model)
    k = spec.feature_layer % (n + 1)  # index into hidden_states (0: embeddings)
    layers = _layer_list(model)
    if k < n and k > 0 and layers is not None:
        del layers[k:]
        model.config.num_hidden_layers = k
    for owner in model.modules():
        if getattr(owner, "use_head", False) and isinstance(getattr(owner, "head", None), nn.Module):
            owner.use_head = False
            del owner.head
            model.config.vision_use_head = False
    if not spec.post_layernorm:
        for owner in model.modules():
            for attr in ("post_layernorm", "layernorm"):  # SigLIP/CLIP (last_hidden_state), DINOv2
                if isinstance(getattr(owner, attr, None), nn.LayerNorm):
                    setattr(owner, attr, nn.Identity())
    feature_layer = -1 if model.config.num_hidden_layers == k else spec.feature_layer
    return replace(spec, feature_layer=feature_layer, hf_config=model.config.to_dict())


def _num_layers(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_hidden_layers"))


def _post_layernorm(model: nn.Module) -> nn.Module:
    for attr in ("post_layernorm", "layernorm"):  # SigLIP/CLIP, DINOv2
        for owner in (model, getattr(model, "vision_model", None)):
            if owner is not None and isinstance(getattr(owner, attr, None), nn.Module):
                return getattr(owner, attr)
    raise ModelLoadError(f"{type(model).__name__} has no final layer norm; set post_layernorm: false")


def count_prefix_tokens(model: nn.Module, select: str) -> int:
    """How many leading tokens are not patches: CLS (CLIP, DINOv2) and register tokens."""
    if select == "full":
        return 0
    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    if mt.startswith("siglip"):
        return 0
    return 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)


def image_stats(folder: Path | None, model_type: str) -> tuple[list[float], list[float]]:
    """Mean/std from a folder's preprocessor_config.json, else the family's defaults."""
    if folder is not None:
        pp = Path(folder) / "preprocessor_config.json"
        if pp.is_file():
            data = json.loads(pp.read_text())
            if "image_mean" in data and "image_std" in data:
                return [float(v) for v in data["image_mean"]], [float(v) for v in data["image_std"]]
    mean, std = _DEFAULT_STATS.get(model_type, _DEFAULT_STATS["siglip"])
    return list(mean), list(std)


def load_vision_model(path: str | Path, attn_implementation: str | None = None) -> nn.Module:
    """A vision model from a local folder: SigLIP/CLIP vision towers, DINOv2, or the vision half of a dual model."""
    from transformers import AutoConfig, AutoModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"vision encoder folder {folder} has no config.json (a local Hugging Face folder is needed)")
    cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModel.from_pretrained(str(folder), **kwargs)
    except (ValueError, ImportError):
        kwargs.pop("attn_implementation", None)  # some vision models have no SDPA/FA2 path
        model = AutoModel.from_pretrained(str(folder), **kwargs)
    if hasattr(model, "vision_model") and getattr(cfg, "model_type", "") in ("siglip", "clip"):
        # A dual (text + vision) checkpoint: keep the vision half.
        from transformers import AutoModel as _AM

        vision = _AM.from_config(cfg.vision_config)
        vision.vision_model.load_state_dict(model.vision_model.state_dict())
        model = vision
    return model.eval()


def vision_model_from_config(hf_config: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    cfg = dict(hf_config)
    model_type = cfg.pop("model_type")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))


def check_same_patch_grid(encoders: Sequence[VisionEncoder], image_size: int) -> int:
    """Every encoder must give the same number of patches: features are concatenated per patch."""
    counts = {e.spec.name: e.num_patches(image_size) for e in encoders}
    for e in encoders:
        if e.native_size not in (None, image_size) and not e.can_resize:
            raise ModelLoadError(
                f"encoder '{e.spec.name}' was built for {e.native_size}px images, cannot interpolate its position "
                f"embeddings, and model.image_size is {image_size}; set model.image_size: {e.native_size}"
            )
    if len(set(counts.values())) != 1:
        raise ModelLoadError(f"encoders give different patch counts at {image_size}px: {counts}; "
                             "choose encoders with the same patch grid")
    return next(iter(counts.values()))
