"""Build a VLA from local Hugging Face checkpoints, as the config describes.

Three source kinds, one result (`VisionLanguageActionModel` + tokenizer):
- "llava": a `LlavaForConditionalGeneration` folder, split into its vision
  tower, projector and LLM;
- "paligemma": a `PaliGemmaForConditionalGeneration` folder, likewise;
- "parts": separate encoder folders + an LLM folder + a new projector
  (Prismatic-style paired encoders, e.g. DINOv2 + SigLIP + Llama-2).
An encoder whose `path` is null is a copy of the source VLM's own tower; with
`projector.init: source`, k such copies get the source projector's first
weight split as [W/k | ... | W/k], so the VLA computes exactly what the
source VLM computed at step 0 (the paper's siamese layout): the same image
tokens, placed and attended as the source family does (`SequenceLayout`), so
the same LLM logits.

Everything is read from local folders; nothing here may reach a model hub.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from vla_scale.config.schema import ModelConfig
from vla_scale.errors import ModelLoadError, VLAScaleError
from vla_scale.models.projector import Projector
from vla_scale.models.vision import (
    EncoderSpec,
    VisionEncoder,
    check_same_patch_grid,
    count_prefix_tokens,
    image_stats,
    load_vision_model,
)
from vla_scale.models.vla import FrozenEncoders, VisionLanguageActionModel, VLACore, layout_for_source

log = logging.getLogger(__name__)

VLA_PROMPT = "<VLA_PROMPT>"
VLM_PROMPT = "<VLM_PROMPT>"
PAD_TOKEN = "<PAD>"


def choose_attn_implementation(requested: str = "auto") -> str:
    """flash_attention_2 when flash_attn imports and a GPU is present, SDPA otherwise."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def require_folder(folder: str | Path | None, key: str) -> Path:
    """A local folder named by config key `key`, or a one-line error naming both (never a hub look-up)."""
    if not folder or not Path(folder).is_dir():
        raise ModelLoadError(f"{key}: folder {folder!r} does not exist (a local Hugging Face folder is needed)")
    return Path(folder)


def detect_source_type(folder: str | Path) -> str:
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"source VLM folder {folder} has no config.json (a local Hugging Face folder is needed)")
    model_type = json.loads(cfg_path.read_text()).get("model_type", "")
    if model_type in ("llava", "paligemma"):
        return model_type
    raise ModelLoadError(
        f"{cfg_path}: model_type {model_type!r} is not a supported source VLM "
        "(llava, paligemma); use source_type: parts for separate encoders + LLM"
    )


@dataclass
class SourceParts:
    """A source VLM taken apart."""

    vision_tower: nn.Module | None
    projector_linears: list[nn.Linear]
    projector_activation: str | None
    post_scale: float
    llm: nn.Module
    vision_select: str  # "patch" or "full" for the source's own tower
    vision_feature_layer: int
    vision_post_layernorm: bool
    folder: Path
    source_type: str  # "llava" or "paligemma": decides the sequence layout
    extra: dict[str, Any] = field(default_factory=dict)


def _causal_lm_from_parts(text_config, decoder: nn.Module, lm_head: nn.Module) -> nn.Module:
    """Wrap a VLM's decoder and head as a standalone causal LM without copying weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_config)
    llm.model = decoder
    llm.lm_head = lm_head
    # Anything not from the VLM is a placeholder left over (compared by identity: in the planner the
    # VLM itself is on the meta device).
    taken = {id(t) for m in (decoder, lm_head) for t in [*m.parameters(), *m.buffers()]}
    leftover = [n for n, t in list(llm.named_parameters()) + list(llm.named_buffers()) if id(t) not in taken]
    if leftover:
        raise ModelLoadError(f"could not take the LLM out of the source VLM: {leftover[:3]} were not found")
    return llm


def _take_apart(m: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(vision_tower, projector, decoder, lm_head) across transformers layouts (<4.52 and >=4.52)."""
    inner = getattr(m, "model", None)
    if inner is not None and hasattr(inner, "vision_tower"):
        return inner.vision_tower, inner.multi_modal_projector, inner.language_model, m.lm_head
    lm = m.language_model  # older layout: language_model is a CausalLM
    return m.vision_tower, m.multi_modal_projector, lm.model, lm.lm_head


def source_image_features(vlm: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The source VLM's own projected image tokens, (B, P, H), across transformers versions.

    `get_image_features` returns a tensor (PaliGemma, 4.x), a list per image (LLaVA, 4.x)
    or a model output whose `pooler_output` holds them (5.x).
    """
    out = vlm.model.get_image_features(pixel_values) if hasattr(vlm, "model") else vlm.get_image_features(
        pixel_values)
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (list, tuple)):
        out = torch.stack(list(out))
    return out


@torch.no_grad()
def _paligemma_image_scale(vlm: nn.Module, tower: nn.Module, proj: nn.Module, hidden: int, folder: Path) -> float:
    """Whether this transformers version scales PaliGemma's image tokens by 1/sqrt(hidden).

    transformers 4.x divides them (Gemma then multiplies every input embedding by
    sqrt(hidden)); 5.x scales text embeddings inside the embedding layer and leaves image
    tokens alone. Measured, not assumed: one forward of the vision tower.
    """
    size = int(tower.config.image_size)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = x.to(next(tower.parameters()).dtype)
    theirs = source_image_features(vlm, x).float()
    mine = proj(tower(x).last_hidden_state).float()
    scale = float((theirs * mine).sum() / (mine * mine).sum())
    for candidate in (1.0, 1.0 / math.sqrt(hidden)):
        if abs(scale - candidate) <= 1e-3 * candidate:
            return candidate
    raise ModelLoadError(f"{folder}: cannot reproduce the PaliGemma image tokens of this transformers version "
                         f"(measured scale {scale:.6g}); please report this")


def load_source_vlm(folder: str | Path, source_type: str, attn: str) -> SourceParts:
    from transformers import AutoConfig

    folder = require_folder(folder, "model.source")
    if source_type == "auto":
        source_type = detect_source_type(folder)
    try:
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.source: cannot read {folder}/config.json: {str(e).splitlines()[0]}") from None
    try:
        if source_type == "llava":
            from transformers import LlavaForConditionalGeneration as Cls
        else:
            from transformers import PaliGemmaForConditionalGeneration as Cls
        m = Cls.from_pretrained(str(folder), local_files_only=True, attn_implementation=attn,
                                dtype=torch.float32)
    except OSError as e:
        raise ModelLoadError(f"cannot load the {source_type} VLM from {folder}: {str(e).splitlines()[0]}") from None
    return take_apart_source(m, cfg, folder, source_type)


def take_apart_source(m: nn.Module, cfg: Any, folder: Path, source_type: str,
                      measure_image_scale: bool = True) -> SourceParts:
    """A LLaVA or PaliGemma model (with weights, or on the meta device for `vla-scale plan`) as `SourceParts`.

    `measure_image_scale=False` skips the forward that measures PaliGemma's image-token scale (a
    meta-device model has no values to measure; the scale is a number, not a parameter).
    """
    tower, proj, decoder, head = _take_apart(m)
    llm = _causal_lm_from_parts(cfg.text_config, decoder, head)
    if source_type == "llava":
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ModelLoadError(f"{folder}: multi-layer vision_feature_layer {layer} is not supported")
        act = getattr(cfg, "projector_hidden_act", "gelu")
        act = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act)
        if act is None:
            raise ModelLoadError(f"{folder}: projector activation {cfg.projector_hidden_act!r} is not supported")
        return SourceParts(tower, [proj.linear_1, proj.linear_2], act, 1.0, llm,
                           "patch" if cfg.vision_feature_select_strategy == "default" else "full",
                           layer, False, folder, "llava")
    # PaliGemma: last_hidden_state (post-layernorm), one linear, and (transformers 4.x) / sqrt(hidden).
    scale = (_paligemma_image_scale(m, tower, proj, cfg.text_config.hidden_size, folder) if measure_image_scale
             else 1.0 / math.sqrt(cfg.text_config.hidden_size))
    return SourceParts(tower, [proj.linear], None, scale, llm, "full", -1, True, folder, "paligemma")


def load_tokenizer(folder: str | Path):
    """The LLM's tokenizer with our prompt tokens added (`assemble_vla` resizes the embeddings to its length)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {str(e).splitlines()[0]}") from None
    new = [t for t in (VLA_PROMPT, VLM_PROMPT) if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)  # never split, never merged with neighbours
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer in {folder} has no EOS token; actions and answers end with EOS")
    if tok.bos_token_id is None:
        # Qwen2.x has no BOS. LLaVA's layout puts the image after position 0, so every sequence
        # starts with one fixed token; EOS (<|endoftext|>) serves, as document separators do.
        log.info("tokenizer in %s has no BOS token; using EOS %r to start sequences", folder, tok.eos_token)
        tok.bos_token = tok.eos_token
    return tok


def resize_embeddings(llm: nn.Module, n: int) -> None:
    old = llm.get_input_embeddings().weight.shape[0]
    if n > old:
        # Round up to a multiple of 64 (tensor-core friendly); new rows start at the mean embedding.
        llm.resize_token_embeddings(n, pad_to_multiple_of=64, mean_resizing=False)
        with torch.no_grad():
            for emb in {llm.get_input_embeddings(), llm.get_output_embeddings()}:
                if emb is not None:
                    emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)


def _encoder(model: nn.Module, name: str, trainable: bool, feature_layer: int, post_ln: bool, select: str,
             folder: Path | None) -> VisionEncoder:
    mean, std = image_stats(folder, getattr(model.config, "model_type", ""))
    spec = EncoderSpec(name=name, trainable=trainable, feature_layer=feature_layer, post_layernorm=post_ln,
                       num_prefix_tokens=count_prefix_tokens(model, select), image_mean=mean, image_std=std,
                       hf_config=model.config.to_dict())
    return VisionEncoder(model, spec)


def build_vla(cfg: ModelConfig) -> tuple[VisionLanguageActionModel, Any]:
    """The VLA and its tokenizer from a `ModelConfig` (see module docstring)."""
    if not cfg.encoders:
        raise ModelLoadError("model.encoders is empty: list at least one vision encoder")
    attn = choose_attn_implementation(cfg.attn_implementation)
    log.info("attention implementation: %s", attn)
    source: SourceParts | None = None
    if cfg.source_type != "parts":
        if not cfg.source:
            raise ModelLoadError("model.source: the source VLM folder is not set")
        source_type = cfg.source_type
        if source_type == "auto":
            source_type = detect_source_type(require_folder(cfg.source, "model.source"))
        if source_type == "paligemma" and attn == "flash_attention_2":
            log.info("flash_attention_2 cannot express PaliGemma's prefix-LM mask; using sdpa")
            attn = "sdpa"
        source = load_source_vlm(cfg.source, source_type, attn)
        llm = source.llm
    else:
        from transformers import AutoModelForCausalLM

        require_folder(cfg.llm, "model.llm")
        try:
            llm = AutoModelForCausalLM.from_pretrained(cfg.llm, local_files_only=True, attn_implementation=attn,
                                                       dtype=torch.float32)
        except OSError as e:
            raise ModelLoadError(f"cannot load the LLM from {cfg.llm}: {str(e).splitlines()[0]}") from None
    encoder_models = [None if ec.path is None else
                      load_vision_model(require_folder(ec.path, f"model.encoders.{i}.path"), attn)
                      for i, ec in enumerate(cfg.encoders)]
    tok_folder = cfg.tokenizer or (cfg.source if source is not None else cfg.llm)
    tokenizer = load_tokenizer(require_folder(tok_folder, "model.tokenizer" if cfg.tokenizer else
                                              ("model.source" if source is not None else "model.llm")))
    return assemble_vla(cfg, llm, source, encoder_models, len(tokenizer)), tokenizer


def assemble_vla(cfg: ModelConfig, llm: nn.Module, source: SourceParts | None,
                 encoder_models: list[nn.Module | None], vocab_size: int) -> VisionLanguageActionModel:
    """The VLA from its parts: the one place where encoders, projector and LLM become a model.

    `encoder_models[i]` is the vision model of `cfg.encoders[i]` when it has a `path`, None for a copy of
    the source's tower; `vocab_size` is the tokenizer's length (the embeddings are resized to it).
    `build_vla` calls this with loaded weights, `vla_scale.train.plan.build_meta_model` with
    shapes on the meta device, so the planner counts exactly what training builds.
    """
    encoders: list[VisionEncoder] = []
    n_copies = sum(ec.path is None for ec in cfg.encoders)
    if n_copies and (source is None or source.vision_tower is None):
        raise ModelLoadError("an encoder has path: null but there is no source VLM tower to copy")
    # Copies are made before any encoder trims its tower (trimming works in place).
    towers = [source.vision_tower] + [copy.deepcopy(source.vision_tower) for _ in range(n_copies - 1)] \
        if n_copies else []
    copies_of_source = 0
    for i, ec in enumerate(cfg.encoders):
        if ec.path is None:
            model = towers[copies_of_source]
            copies_of_source += 1
            select = source.vision_select if ec.select == "auto" else ec.select
            encoders.append(_encoder(model, ec.name, ec.trainable, ec.feature_layer, ec.post_layernorm, select,
                                     source.folder))
        else:
            model = encoder_models[i]
            select = "patch" if ec.select == "auto" else ec.select
            encoders.append(_encoder(model, ec.name, ec.trainable, ec.feature_layer, ec.post_layernorm, select,
                                     Path(ec.path)))
    if source is not None and copies_of_source:
        # The source's own feature layer/post-norm decide what its projector was trained on.
        for enc, ec in zip(encoders, cfg.encoders):
            if ec.path is None and (ec.feature_layer, ec.post_layernorm) != (
                    source.vision_feature_layer, source.vision_post_layernorm):
                log.warning("encoder '%s' reads layer %s (post_layernorm=%s) but the source VLM used %s (%s)",
                            ec.name, ec.feature_layer, ec.post_layernorm,
                            source.vision_feature_layer, source.vision_post_layernorm)
    num_tokens = check_same_patch_grid(encoders, cfg.image_size)

    llm_hidden = llm.get_input_embeddings().weight.shape[1]
    in_dims = [e.feature_dim for e in encoders]
    pc = cfg.projector
    if pc.init == "source":
        assert source is not None
        if copies_of_source != len(encoders):
            raise ModelLoadError("projector.init: source needs every encoder to be a copy of the source tower "
                                 "(path: null); use init: random for paired encoders")
        dims = [l.out_features for l in source.projector_linears]
        projector = Projector(in_dims, dims, source.projector_activation or pc.activation, source.post_scale,
                              pc.fused_kernel)
        projector.split_first_weight_from(source.projector_linears[0], copies_of_source)
        with torch.no_grad():
            for mine, theirs in zip(projector.layers[1:], source.projector_linears[1:]):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
    else:
        projector = Projector(in_dims, [*pc.hidden_dims, llm_hidden], pc.activation, 1.0, pc.fused_kernel)

    resize_embeddings(llm, vocab_size)
    if cfg.gradient_checkpointing:
        # The LLM and every trained encoder: a trained DINOv2 ViT-L holds about as many activations
        # as the checkpointed Llama-2-7B at 32 x 512 tokens (vla-scale plan). Frozen encoders run
        # under no_grad and keep none.
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for e in encoders:
            if e.spec.trainable and getattr(e.model, "supports_gradient_checkpointing", False):
                e.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llm.config.use_cache = False

    for e in encoders:
        e.requires_grad_(e.spec.trainable)
    frozen = FrozenEncoders([e for e in encoders if not e.spec.trainable])
    core = VLACore([e for e in encoders if e.spec.trainable], projector, llm, [e.spec.name for e in encoders],
                   layout_for_source(source.source_type if source is not None else "parts"))
    if cfg.state_dim:
        core.attach_state_projection(cfg.state_dim)  # data.state: projection
    vla = VisionLanguageActionModel(frozen, core, cfg.image_size, num_tokens)
    log.info("VLA built: %d image tokens, frozen %.2fM params (%s), trainable %.2fM params",
             num_tokens, vla.frozen_parameter_count() / 1e6, ",".join(frozen.encoders.keys()) or "none",
             vla.trainable_parameter_count() / 1e6)
    return vla


# --------------------------------------------------------------------------- one build for many ranks
#
# Under ZeRO-3 only one rank needs the weights on the host: `deepspeed.zero.Init(module=core)`
# broadcasts every core parameter from rank 0 and keeps each rank's partition anyway. So rank 0
# runs `build_vla` (the one home of the assembly and its surgery) and sends the others a
# *skeleton*: the same modules with every parameter on the meta device (shapes and dtypes, no
# storage) and the small buffers and attributes (RoPE tables, layouts, specs, configs) as they
# are, plus the tokenizer. Identical module trees by construction, so parameters come in the
# same order on every rank. The frozen encoders' parameters are broadcast straight onto each
# rank's device (they are replicated, not partitioned); the core's stay meta until
# `MaterializingView` gives each, in turn, storage for DeepSpeed's broadcast. Ranks other
# than 0 never read a checkpoint file and never hold a full parameter set on the host.


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no storage); buffers and attributes are copied."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def build_vla_on_rank0(cfg: ModelConfig, device: torch.device) -> tuple[VisionLanguageActionModel, Any]:
    """`build_vla` on rank 0 only; every rank returns a model whose core may be meta (collective).

    Rank 0's model is `build_vla`'s (weights on the host). Other ranks get
    rank 0's skeleton, with the frozen encoders' parameters broadcast onto
    `device` in the precision they were built in (the trainer hashes them
    before the strategy converts them); their core parameters stay on the
    meta device until `MaterializingView` hands them to zero.Init. The
    default process group must be initialised.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    result: tuple[VisionLanguageActionModel, Any] | None = None
    error: VLAScaleError | None = None
    if rank == 0:
        try:
            result = build_vla(cfg)
        except VLAScaleError as e:
            error = e
    # The skeleton travels pickled: module objects, configs and small buffers (50 kB for the tiny preset).
    box: list[Any] = [(error, None) if result is None else (None, (meta_skeleton(result[0]), result[1]))]
    dist.broadcast_object_list(box, src=0)
    error, payload = box[0]
    if error is not None:
        raise error  # every rank fails with rank 0's message; none is left waiting for it
    if rank == 0:
        assert result is not None
        model = result[0]
    else:
        model, tokenizer = payload
        result = (model, tokenizer)
        _run_constructors_once(model)
    # NCCL broadcasts device tensors: rank 0 sends each frozen parameter from a device copy.
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    for p in materialize_parameters(model.frozen, comm_device):
        dist.broadcast(p.detach().to(comm_device) if rank == 0 else p.data, src=0)
    return result


def _run_constructors_once(model: nn.Module) -> None:
    """Construct each Hugging Face model class found in an unpickled `model` once, on the meta device.

    Unpickling skips `__init__`, and some of what it does is process-wide
    rather than per instance: transformers 4.5x registers each class's output
    recorders there, without which `output_hidden_states=True` returns None.
    A throwaway instance per class, without storage, does it through the
    public constructor, whatever the version registers.
    """
    from transformers import PreTrainedModel

    classes = {type(m): m.config for m in model.modules() if isinstance(m, PreTrainedModel)}
    for cls, config in classes.items():
        with torch.device("meta"):
            cls(config)


def materialize_parameters(module: nn.Module, device: torch.device) -> Iterator[nn.Parameter]:
    """`module.parameters()`, in their order, each meta one first replaced by a parameter with
    uninitialised storage on `device` (in every module that holds it: tied weights stay tied).

    Lazy: the replacement happens when the iteration reaches it, so a caller
    that fills and then shrinks each parameter (ZeRO-3's partitioning) never
    has more than one of them in full. A meta tensor cannot be given storage
    in place (`.data` refuses to change the device type), hence a new parameter.
    """
    done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(as found) -> (as found, kept alive; as used)
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) in done:
                sub._parameters[name] = done[id(p)][1]
                continue
            real = p
            if p.is_meta:
                real = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
                sub._parameters[name] = real
            done[id(p)] = (p, real)
            yield real


class MaterializingView(nn.Module):
    """`core` as `deepspeed.zero.Init(module=...)` should see it on a rank that holds a meta skeleton.

    zero.Init converts `module.parameters()` one at a time: it broadcasts rank
    0's values into the parameter, keeps this rank's partition and frees the
    rest before it asks for the next one. This view yields the core's
    parameters in their order and gives a meta one uninitialised storage on
    `device` just before it is handed over, so at most one full parameter
    exists at a time. On a rank with real weights it changes nothing. The
    children are the core's (like `_EngineView`), so zero.Init's buffer
    handling sees the same modules under the same names.
    """

    def __init__(self, core: nn.Module, device: torch.device):
        super().__init__()
        for name, child in core.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_core", core)
        object.__setattr__(self, "_device", device)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return materialize_parameters(self._core, self._device)
