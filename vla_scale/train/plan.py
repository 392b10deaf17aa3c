"""Memory planning: what one GPU needs to train a config under ZeRO-3, before any weight exists.

`plan_memory(cfg, gpus=8)` builds the VLA the config describes on the meta
device (shapes only: no weights are read, no memory is allocated), counts its
parameters per component, and turns the counts into per-rank bytes for a
data-parallel world of `gpus x nodes` ranks. Architectures come from the
local weights folders when they exist (their config.json), else from the
architecture JSONs named by `model.llm_arch` / `model.encoders.N.arch`, so a
7B plan runs on a laptop in seconds. `vla-scale plan` prints the result.

This module must never load weights, reach a model hub, start a process
group or touch a GPU; it only does arithmetic on shapes. It is an estimate:
it says what it assumes, and the cross-check against DeepSpeed's own
estimator is printed with it.

The formulas (P = trainable parameters, F = frozen-encoder parameters,
W = world size, b = micro-batch, s = sequence length, h = hidden width,
a = attention heads, L = layers; bytes in bf16 mixed precision):

* Model states under ZeRO-3, per rank (mixed-precision Adam, ZeRO paper):
  bf16 parameters 2P/W + fp32 master weights 4P/W + Adam exp_avg and
  exp_avg_sq 8P/W + gradients 4P/W = 18P/W: ZeRO-3's partitioned gradient
  buffer has the accumulation dtype, fp32 by default
  (deepspeed.grad_accum_dtype; with bf16 it is 2P/W and the total the ZeRO
  paper's 16P/W). (fp32 training: 4 + 4 + 8, no master copy: 16P/W.)
  Frozen encoders are not in P: they have no gradients and no optimizer state.
* Frozen encoders, outside the engine: 2F per rank (bf16, replicated), no
  communication. Inside the engine they would be partitioned (2F/W) but
  all-gathered for every forward: 2F(W-1)/W bytes received per rank per
  micro-batch.
* ZeRO-3 working set, per rank: the gathered parameters in flight, estimated
  as 2 B x min(stage3_max_live_parameters, largest layer +
  stage3_prefetch_bucket_size, P) (DeepSpeed gathers module by module and
  prefetches up to the bucket ahead); persistent parameters (tensors of at
  most stage3_param_persistence_threshold elements stay whole on every
  rank): 2 B x their count; the contiguous-gradient reduce bucket,
  allocated once in the communication dtype: 4 B (deepspeed.communication_data_type
  fp32, the default; 2 B in bf16) x reduce_bucket_size; and, during the optimizer step
  only, the fp32 gradient of one optimizer sub-group: 4 B x min(sub_group_size,
  P/W) (DeepSpeed's default sub_group_size is 1e9).
* Activations per transformer layer (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", 16-bit, no tensor
  or sequence parallelism): sbh(34 + 5as/h) bytes without recomputation.
  34 assumes a plain GELU MLP of width 4h (the ViT encoders); the LLMs
  here have gated MLPs of width I (Llama 2.7h, Qwen2.5 5.4h, Gemma 8h), so
  their MLP term 19 becomes 2 + 8I/h and HF's fp32 norm inputs add 4:
  sbh(21 + 8I/h + 5as/h). The 5as/h term is the stored s x s attention
  scores; flash attention and SDPA's memory-efficient kernels do not store
  them, so it is dropped unless `model.attn_implementation` is "eager".
  With full activation checkpointing a layer keeps only its input, 2sbh,
  and one layer at a time is recomputed in backward: L x 2sbh + one layer.
  Counted for the LLM's layers (s = image tokens + text tokens) and for the
  trainable encoders' layers up to the feature layer (s = patches +
  CLS/register tokens). Measured per layer on Hugging Face layers (bf16,
  SDPA, every tensor saved for backward, parameters excluded), on CPU:
  Llama-style 45.6 sbh (formula 42.5), Gemma-style with I = 8h 89.2 (85),
  DINOv2 36.1 (34), SigLIP 32.1 (34); on an H200 (CUDA SDPA, memory held
  after forward): Llama-2-7B-shaped layers 44.5 (42.5) and 2.0 with
  checkpointing (2), DINOv2 ViT-L 36.0 (34). tests/test_plan.py keeps the
  formulas within -10%/+15% of the CPU measurement.
* Projector activations: b x image tokens x (2 x concatenated input width +
  2 x each hidden width + output width) values; the LM head's logits exist
  only at answer positions: b x answer tokens x vocabulary x (2 + 4 + 4) B
  (bf16 logits, their fp32 copy, cross-entropy's fp32 log-softmax).
* Host memory at start: `build_vla` loads every weight in fp32, so a rank
  that builds the model holds 4(P + F) bytes. Under ZeRO-3 only rank 0 does
  (the others receive a skeleton and their partitions, on the device): per
  node 4(P + F) on node 0 and nothing on the others, against ranks per node
  x 4(P + F) when every rank builds it (deepspeed.build_on_every_rank).
* Peak per rank = model states + frozen encoders + persistent parameters +
  reduce bucket + max(gathered parameters + activations, fp32 sub-group
  gradient). It fits when the peak is at most 90% of the GPU's memory (the
  rest: CUDA context, NCCL buffers, allocator fragmentation).
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_scale.config.presets import arch_dir
from vla_scale.config.schema import Config, ModelConfig
from vla_scale.errors import ConfigError, ModelLoadError
from vla_scale.train.batching import resolve_accumulation

GIB = 2 ** 30
# Share of the GPU's memory the plan may use; the rest is for the CUDA context,
# NCCL buffers and allocator fragmentation, which no formula here counts.
USABLE_FRACTION = 0.9
# The largest world size the "fewest GPUs" search tries.
MAX_WORLD = 4096
# DeepSpeed's default optimizer sub-group size (elements), when the config has none.
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


# -- architecture configs ---------------------------------------------------

def resolve_arch(value: str, key: str, config_dir: Path | None = None) -> Path:
    """An architecture JSON: a path (as given, or next to the config file), or a name in configs/arch/."""
    candidates: list[Path] = []
    p = Path(value).expanduser()
    if value.endswith(".json") or os.sep in value or "/" in value:
        candidates.append(p)
        if config_dir is not None and not p.is_absolute():
            candidates.append(config_dir / p)
    else:
        if config_dir is not None:
            candidates.append(config_dir / "arch" / f"{value}.json")
        if not any(c.is_file() for c in candidates):
            candidates.append(arch_dir() / f"{value}.json")  # the installed configs/arch/
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{key}={value!r}: no architecture JSON found (tried {tried})")


def _config_from_dict(data: dict, where: str):
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ModelLoadError(f"{where}: the architecture JSON has no model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{where}: cannot build a {model_type!r} config: {str(e).splitlines()[0]}") from None


def load_arch(folder: str | None, arch: str | None, folder_key: str, arch_key: str,
              config_dir: Path | None) -> tuple[Any, str]:
    """(Hugging Face config, where it came from): the weights folder's config.json, else the arch JSON."""
    from transformers import AutoConfig

    if folder and (Path(folder) / "config.json").is_file():
        return AutoConfig.from_pretrained(str(folder), local_files_only=True), str(folder)
    if arch:
        path = resolve_arch(arch, arch_key, config_dir)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{arch_key}: {path} is not readable JSON: {e}") from None
        return _config_from_dict(data, str(path)), str(path)
    raise ModelLoadError(
        f"{folder_key}={folder!r} is not a local Hugging Face folder (no config.json) and {arch_key} is not set: "
        f"fill the folder, or set {arch_key} to an architecture JSON (e.g. one in configs/arch/) to plan "
        f"without weights"
    )


def _vision_config(cfg):
    # A dual (text + vision) checkpoint: its vision half, as `load_vision_model` keeps it.
    if getattr(cfg, "model_type", "") in ("siglip", "clip") and hasattr(cfg, "vision_config"):
        return cfg.vision_config
    return cfg


# -- the model on the meta device -----------------------------------------

@dataclass
class MetaModel:
    """The VLA built on the meta device, and where each part's architecture came from."""

    vla: Any  # VisionLanguageActionModel with meta tensors
    origins: dict[str, str]  # component -> folder or arch JSON
    vocab_before: int
    vocab_after: int
    tokenizer_length: int
    tokenizer_assumed: bool  # no tokenizer folder: its length was taken as the config's vocab_size
    tokenizer_error: str | None = None  # the tokenizer folder exists but `load_tokenizer` rejects it


def build_meta_model(mc: ModelConfig, config_dir: Path | None = None) -> MetaModel:
    """The VLA `build_vla` would build from `mc`, with shapes only.

    Only where the parts come from differs from `vla_scale.models.loading.build_vla`: every Hugging
    Face model is built with `from_config` under `torch.device("meta")` (from the weights folder's
    config.json or the architecture JSON), then handed to the same `take_apart_source` and
    `assemble_vla` that training uses.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from vla_scale.models.loading import assemble_vla, load_tokenizer, take_apart_source

    if not mc.encoders:
        raise ModelLoadError("model.encoders is empty: list at least one vision encoder")
    origins: dict[str, str] = {}
    with torch.device("meta"):
        source = None
        if mc.source_type == "parts":
            llm_cfg, origins["llm"] = load_arch(mc.llm, mc.llm_arch, "model.llm", "model.llm_arch", config_dir)
            llm = AutoModelForCausalLM.from_config(llm_cfg)
        else:
            source_cfg, origins["llm"] = load_arch(mc.source, mc.llm_arch, "model.source", "model.llm_arch",
                                                   config_dir)
            found = getattr(source_cfg, "model_type", "")
            source_type = found if mc.source_type == "auto" else mc.source_type
            if source_type not in ("llava", "paligemma") or found != source_type:
                raise ModelLoadError(f"{origins['llm']}: model_type {found!r} does not match "
                                     f"model.source_type={mc.source_type!r} (expected llava or paligemma)")
            if source_type == "llava":
                from transformers import LlavaForConditionalGeneration as Cls
            else:
                from transformers import PaliGemmaForConditionalGeneration as Cls
            source = take_apart_source(Cls(source_cfg), source_cfg, Path(mc.source), source_type,
                                       measure_image_scale=False)
            llm, llm_cfg = source.llm, source_cfg.text_config
            for ec in mc.encoders:
                if ec.path is None:
                    origins[ec.name] = f"{origins['llm']} (vision tower)"
        vocab_before = llm.get_input_embeddings().weight.shape[0]

        towers: list[nn.Module | None] = []
        for i, ec in enumerate(mc.encoders):
            if ec.path is None:
                towers.append(None)
                continue
            vcfg, origins[ec.name] = load_arch(ec.path, ec.arch, f"model.encoders.{i}.path",
                                               f"model.encoders.{i}.arch", config_dir)
            towers.append(AutoModel.from_config(copy.deepcopy(_vision_config(vcfg))))  # encoders trim their config
        origins["projector"] = (f"{origins['llm']} (projector, first weight split over {len(mc.encoders)})"
                                if mc.projector.init == "source" else "new (random init)")

        tok_folder = mc.tokenizer or (mc.source if source is not None else mc.llm)
        tokenizer_length, assumed, tokenizer_error = 0, True, None
        if tok_folder and any((Path(tok_folder) / f).is_file() for f in _TOKENIZER_FILES):
            try:
                tokenizer_length, assumed = len(load_tokenizer(tok_folder)), False
            except ModelLoadError as e:
                # Training would stop here; the plan still says what memory it would need.
                tokenizer_error = str(e)
        if assumed:
            # As `load_tokenizer` would: two prompt tokens, plus a pad token when the LLM has none.
            tokenizer_length = int(llm_cfg.vocab_size) + 2 + (getattr(llm_cfg, "pad_token_id", None) is None)
        vla = assemble_vla(mc, llm, source, towers, tokenizer_length)
    return MetaModel(vla, origins, vocab_before, llm.get_input_embeddings().weight.shape[0], tokenizer_length,
                     assumed, tokenizer_error)


# -- counting -----------------------------------------------------------------

@dataclass
class TransformerShape:
    """What the activation formula needs of one transformer stack."""

    layers: int  # layers whose activations are kept for backward
    hidden: int
    heads: int
    tokens_per_sample: int
    gated_intermediate: int | None = None  # width of a gated (SwiGLU/GeGLU) MLP; None: a plain GELU MLP


@dataclass
class ParameterCounts:
    frozen_encoders: dict[str, int]
    trainable_encoders: dict[str, int]
    projector: int
    llm: int
    largest_layer: int  # DeepSpeed's convention: most parameters owned directly by one module
    largest_layer_name: str
    persistent: int  # trainable parameters in tensors small enough to stay whole on every rank
    llm_shape: TransformerShape = field(default_factory=lambda: TransformerShape(0, 0, 0, 0))
    encoder_shapes: dict[str, TransformerShape] = field(default_factory=dict)
    projector_widths: list[int] = field(default_factory=list)  # concatenated input, hidden..., output
    image_tokens: int = 0
    vocab: int = 0

    @property
    def frozen(self) -> int:
        return sum(self.frozen_encoders.values())

    @property
    def trainable(self) -> int:
        return sum(self.trainable_encoders.values()) + self.projector + self.llm


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters once


def count_parameters(meta: MetaModel, persistence_threshold: int = 100_000) -> ParameterCounts:
    """Parameters per component (tied weights once) and the shapes the activation formulas need."""
    from vla_scale.models.vision import count_prefix_tokens

    vla = meta.vla
    core = vla.core
    largest, largest_name = 0, ""
    for name, m in core.named_modules():
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if n > largest:
            largest, largest_name = n, name
    persistent = sum(p.numel() for p in core.parameters() if p.requires_grad and p.numel() <= persistence_threshold)

    def encoder_shape(enc) -> TransformerShape:
        cfg = enc.model.config
        n_states = int(cfg.num_hidden_layers) + 1
        used = enc.spec.feature_layer % n_states  # hidden_states[i] is the output of layer i
        # Every token runs through the ViT, the CLS/register tokens included, whatever is read out.
        tokens = enc.num_patches(vla.image_size) + count_prefix_tokens(enc.model, "patch")
        return TransformerShape(used, int(cfg.hidden_size), int(cfg.num_attention_heads), tokens)

    lc = core.llm.config
    return ParameterCounts(
        frozen_encoders={n: _numel(e) for n, e in vla.frozen.encoders.items()},
        trainable_encoders={n: _numel(e) for n, e in core.encoders.items()},
        projector=_numel(core.projector),
        llm=_numel(core.llm),
        largest_layer=largest,
        largest_layer_name=largest_name,
        persistent=persistent,
        llm_shape=TransformerShape(int(lc.num_hidden_layers), int(lc.hidden_size), int(lc.num_attention_heads), 0,
                                   _gated_mlp_width(core)),
        encoder_shapes={n: encoder_shape(e) for n, e in core.encoders.items()},
        projector_widths=[sum(core.projector.in_dims), *[l.out_features for l in core.projector.layers]],
        image_tokens=vla.num_image_tokens,
        vocab=meta.vocab_after,
    )


def _gated_mlp_width(core) -> int | None:
    """The LLM's MLP width when its MLP is gated (Llama, Qwen, Gemma: gate_proj/up_proj/down_proj)."""
    layers = getattr(core.decoder(), "layers", None)
    mlp = getattr(layers[0], "mlp", None) if layers else None
    if mlp is not None and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
        return int(mlp.up_proj.out_features)
    return None


# -- bytes ------------------------------------------------------------------------

def layer_activation_bytes(s: int, b: int, h: int, a: int, *, scores: bool, value_bytes: int = 2,
                           gated_intermediate: int | None = None) -> float:
    """Bytes one transformer layer keeps for backward (see the module docstring).

    Korthikanti et al.: sbh(34 + 5as/h) in 16-bit, 5as/h only when attention
    scores are stored. With a gated MLP of width I the MLP's 19 sbh become
    2 + 8I/h (gate, up, activation and product are kept; no dropout) and the
    two fp32 norm inputs add 4: sbh(21 + 8I/h + 5as/h).
    """
    per = 34.0 if gated_intermediate is None else 21 + 8 * gated_intermediate / h
    if scores:
        per += 5 * a * s / h
    return s * b * h * per * value_bytes / 2


def stack_activation_bytes(shape: TransformerShape, s: int, b: int, *, checkpointing: bool, scores: bool,
                           value_bytes: int = 2) -> float:
    if shape.layers <= 0:
        return 0.0
    full = layer_activation_bytes(s, b, shape.hidden, shape.heads, scores=scores, value_bytes=value_bytes,
                                  gated_intermediate=shape.gated_intermediate)
    if not checkpointing:
        return shape.layers * full
    # Each layer keeps its input; backward recomputes one layer at a time.
    return shape.layers * 2 * s * b * shape.hidden * value_bytes / 2 + full


def deepspeed_zero3_estimate(total_params: int, largest_layer_params: int, gpus_per_node: int,
                             nodes: int) -> int | None:
    """DeepSpeed's own per-GPU model-state estimate (no offload, zero.Init), or None without DeepSpeed."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return None
    _, gpu_mem, _ = estimate_zero3_model_states_mem_needs(
        total_params=total_params, largest_layer_params=largest_layer_params, num_gpus_per_node=gpus_per_node,
        num_nodes=nodes, cpu_offload=False, cpu_offload_params=False, zero_init=True)
    return int(gpu_mem)


def answer_tokens_per_sample(cfg: Config) -> int:
    """Robot answer tokens (+EOS). Digits are single tokens, so a string value is at most sign, digit, '.',
    the decimals and a separator; a bin action is one token per value."""
    a = cfg.actions
    per_dim = 1 if a.tokenizer == "bins" else a.decimals + 4
    return a.dim * a.chunk * per_dim + 1


@dataclass
class MemoryPlan:
    """Per-rank bytes for one config on `world` ranks. Every `*_bytes` field is bytes per rank."""

    config: str
    gpus_per_node: int
    nodes: int
    world: int
    gpu_memory_bytes: int
    precision: str
    counts: ParameterCounts
    origins: dict[str, str]
    vocab_before: int
    tokenizer_length: int
    tokenizer_assumed: bool
    micro_batch: int
    global_batch: int
    text_tokens: int
    seq_len: int
    answer_tokens: int
    grad_accumulation: int | None  # micro-batches per rank per step on this world; None: the batch cannot divide
    gradient_checkpointing: bool
    scores_stored: bool
    # model states
    params_bytes: float
    master_bytes: float
    adam_bytes: float
    grads_bytes: float
    # frozen encoders
    frozen_bytes: float
    frozen_inside_bytes: float
    frozen_allgather_bytes_per_forward: float
    # ZeRO-3 working set
    gathered_bytes: float
    persistent_bytes: float
    reduce_bucket_bytes: float
    step_fp32_grad_bytes: float
    # activations
    llm_act_bytes: float
    llm_act_ckpt_bytes: float
    encoder_act_bytes: dict[str, float]
    encoder_act_ckpt_bytes: dict[str, float]
    projector_act_bytes: float
    logits_bytes: float
    deepspeed_estimate_bytes: int | None
    notes: list[str] = field(default_factory=list)
    batch_error: str | None = None  # why train.* batch sizes cannot run on this world (vla_scale.train.batching)
    min_gpus: int | None = None  # fewest ranks whose peak fits at this micro-batch (None: more than 4096)
    # Host memory at start: what one rank holds while building the model (build_vla loads in fp32).
    host_build_bytes: float = 0.0

    # -- derived ------------------------------------------------------------
    @property
    def model_state_bytes(self) -> float:
        return self.params_bytes + self.master_bytes + self.adam_bytes + self.grads_bytes

    @property
    def optimizer_state_bytes(self) -> float:
        return self.master_bytes + self.adam_bytes

    @property
    def activation_bytes(self) -> float:
        """Activations as this config runs: the LLM and the trainable encoders are checkpointed
        per `model.gradient_checkpointing` (frozen encoders keep none: they run under no_grad)."""
        ckpt = self.gradient_checkpointing
        llm = self.llm_act_ckpt_bytes if ckpt else self.llm_act_bytes
        enc = sum((self.encoder_act_ckpt_bytes if ckpt else self.encoder_act_bytes).values())
        return llm + enc + self.projector_act_bytes + self.logits_bytes

    @property
    def fixed_bytes(self) -> float:
        return self.model_state_bytes + self.frozen_bytes + self.persistent_bytes + self.reduce_bucket_bytes

    @property
    def forward_backward_peak_bytes(self) -> float:
        return self.fixed_bytes + self.gathered_bytes + self.activation_bytes

    @property
    def optimizer_step_peak_bytes(self) -> float:
        return self.fixed_bytes + self.step_fp32_grad_bytes

    @property
    def peak_bytes(self) -> float:
        return max(self.forward_backward_peak_bytes, self.optimizer_step_peak_bytes)

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_bytes * USABLE_FRACTION

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def host_bytes_per_node_every_rank(self) -> float:
        """Peak host memory per node for the model when every rank builds it (deepspeed.build_on_every_rank)."""
        return self.gpus_per_node * self.host_build_bytes

    @property
    def host_bytes_per_node_rank0(self) -> float:
        """The same when rank 0 alone builds it (the default): node 0 holds one copy, the other nodes none."""
        return self.host_build_bytes

    @property
    def max_micro_batch(self) -> int:
        """Largest micro-batch whose peak fits (activations grow linearly with it)."""
        per_sample = self.activation_bytes / self.micro_batch
        room = self.usable_bytes - self.fixed_bytes - self.gathered_bytes
        if self.optimizer_step_peak_bytes > self.usable_bytes or per_sample <= 0 or room < per_sample:
            return 0
        return int(room // per_sample)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"]["frozen"] = self.counts.frozen
        d["counts"]["trainable"] = self.counts.trainable
        for name in ("model_state_bytes", "optimizer_state_bytes", "activation_bytes", "fixed_bytes",
                     "forward_backward_peak_bytes", "optimizer_step_peak_bytes", "peak_bytes", "usable_bytes",
                     "fits", "max_micro_batch", "host_bytes_per_node_every_rank", "host_bytes_per_node_rank0"):
            d[name] = getattr(self, name)
        d["peak_gib"] = self.peak_bytes / GIB
        return d

    # -- the table -------------------------------------------------------------
    def format_table(self) -> str:
        c = self.counts
        g = lambda x: f"{x / GIB:9.2f}"  # noqa: E731
        m = lambda n: f"{n / 1e6:12,.2f} M"  # noqa: E731
        w = self.world
        lines = [f"vla-scale plan: {self.config}",
                 f"world {w} = {self.gpus_per_node} GPU(s) x {self.nodes} node(s), ZeRO-3, "
                 f"{self.precision}, {self.gpu_memory_bytes / GIB:.0f} GiB per GPU",
                 (f"batch: global {self.global_batch} = micro-batch {self.micro_batch} x accumulation "
                  f"{self.grad_accumulation} x world {w}" if self.batch_error is None else
                  f"batch: CANNOT RUN ON THIS WORLD: {self.batch_error}"), "",
                 "Parameters (built on the meta device)",
                 f"  {'component':<40}{'params':>14}  {'state':<10} from"]
        where = lambda k: _short_path(self.origins.get(k, ""))  # noqa: E731
        for n, v in c.frozen_encoders.items():
            lines.append(f"  {'encoder ' + n:<40}{m(v)}  {'frozen':<10} {where(n)}")
        for n, v in c.trainable_encoders.items():
            lines.append(f"  {'encoder ' + n:<40}{m(v)}  {'trainable':<10} {where(n)}")
        widths = " -> ".join(str(x) for x in c.projector_widths)
        lines.append(f"  {'projector ' + widths:<40}{m(c.projector)}  {'trainable':<10} {where('projector')}")
        tok = "assumed, no tokenizer folder" if self.tokenizer_assumed else "from the tokenizer"
        lines.append(f"  {'LLM (vocab ' + f'{self.vocab_before} -> {c.vocab})':<40}{m(c.llm)}  {'trainable':<10} "
                     f"{where('llm')}")
        lines.append(f"  {'trainable total (P)':<40}{m(c.trainable)}")
        lines.append(f"  {'frozen total (F)':<40}{m(c.frozen)}")
        lines.append(f"  {'largest layer':<40}{m(c.largest_layer)}  {c.largest_layer_name}")
        lines.append(f"  vocabulary: {self.tokenizer_length} tokens ({tok}), embeddings padded to a multiple of 64 "
                     f"= {c.vocab}")
        lines += ["", f"Per-rank memory (GiB)   micro-batch {self.micro_batch}, sequence {self.seq_len - self.text_tokens} image + "
                      f"{self.text_tokens} text = {self.seq_len} tokens, {self.answer_tokens} answer tokens/sample",
                  f"  {'bf16 parameters' if self.precision == 'bf16' else 'fp32 parameters':<44}{g(self.params_bytes)}"
                  f"   {self.params_bytes * w / max(c.trainable, 1):.0f} B x P / W",
                  f"  {'fp32 master weights':<44}{g(self.master_bytes)}   "
                  f"{self.master_bytes * w / max(c.trainable, 1):.0f} B x P / W",
                  f"  {'Adam exp_avg + exp_avg_sq (fp32)':<44}{g(self.adam_bytes)}   8 B x P / W",
                  f"  {'gradients':<44}{g(self.grads_bytes)}   "
                  f"{self.grads_bytes * w / max(c.trainable, 1):.0f} B x P / W",
                  f"  {'= model states':<44}{g(self.model_state_bytes)}   "
                  f"{self.model_state_bytes * w / max(c.trainable, 1):.0f} B x P / W",
                  f"  {'frozen encoders (replicated, outside ZeRO)':<44}{g(self.frozen_bytes)}   "
                  f"{self.frozen_bytes / max(c.frozen, 1):.0f} B x F" if c.frozen else
                  f"  {'frozen encoders':<44}{g(0)}   none",
                  f"  {'ZeRO-3 gathered params (layer + prefetch)':<44}{g(self.gathered_bytes)}",
                  f"  {'ZeRO-3 persistent params':<44}{g(self.persistent_bytes)}   {c.persistent / 1e6:.2f} M",
                  f"  {'ZeRO-3 reduce bucket':<44}{g(self.reduce_bucket_bytes)}",
                  f"  {'activations: LLM, no checkpointing':<44}{g(self.llm_act_bytes)}"
                  f"{'' if self.gradient_checkpointing else '   <- used'}",
                  f"  {'activations: LLM, checkpointing':<44}{g(self.llm_act_ckpt_bytes)}"
                  f"{'   <- used' if self.gradient_checkpointing else ''}"]
        for n in self.encoder_act_bytes:
            lines.append(f"  {'activations: ' + n + ', no checkpointing':<44}{g(self.encoder_act_bytes[n])}"
                         f"{'' if self.gradient_checkpointing else '   <- used'}")
            lines.append(f"  {'activations: ' + n + ', checkpointing':<44}{g(self.encoder_act_ckpt_bytes[n])}"
                         f"{'   <- used' if self.gradient_checkpointing else ''}")
        lines += [f"  {'activations: projector':<44}{g(self.projector_act_bytes)}",
                  f"  {'activations: logits at answer tokens':<44}{g(self.logits_bytes)}",
                  f"  {'peak, forward/backward':<44}{g(self.forward_backward_peak_bytes)}",
                  f"  {'peak, optimizer step (+fp32 sub-group grads)':<44}{g(self.optimizer_step_peak_bytes)}",
                  f"  {'PEAK':<44}{g(self.peak_bytes)}   of {self.usable_bytes / GIB:.1f} usable "
                  f"({USABLE_FRACTION:.0%} of {self.gpu_memory_bytes / GIB:.0f}): "
                  f"{'FITS' if self.fits else 'DOES NOT FIT'}",
                  f"  largest micro-batch that fits: {self.max_micro_batch}; fewest GPUs that fit this micro-batch: "
                  + (str(self.min_gpus) if self.min_gpus else
                     "none (per-rank activations do not shrink with more GPUs: lower the micro-batch or checkpoint)")]
        if self.deepspeed_estimate_bytes is not None:
            ds = self.deepspeed_estimate_bytes
            ds_states = ds - 4 * c.largest_layer
            lines += ["", "Cross-check: deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
                          f"(total_params={c.trainable}, largest_layer_params={c.largest_layer}, "
                          f"num_gpus_per_node={self.gpus_per_node}, num_nodes={self.nodes}, no offload, zero_init)",
                      f"  DeepSpeed: {ds / GIB:.2f} GiB = 18 B x P / W + 4 B x largest layer; "
                      f"without the layer {ds_states / GIB:.2f} GiB, ours {self.model_state_bytes / GIB:.2f} GiB "
                      f"({self.model_state_bytes * w / max(c.trainable, 1):.0f} B x P / W)"]
        if c.frozen and w == 1:
            lines += ["", "Frozen encoders: on one rank, inside or outside the engine costs the same memory and "
                          "no communication"]
        elif c.frozen:
            accum = self.grad_accumulation or 1
            lines += ["", "Frozen encoders: outside the ZeRO-3 engine (this design) vs inside it",
                      f"  outside: {self.frozen_bytes / GIB:.2f} GiB per rank (replicated), no communication",
                      f"  inside:  {self.frozen_inside_bytes / GIB:.2f} GiB per rank (partitioned) but all-gathered "
                      f"every forward: {self.frozen_allgather_bytes_per_forward / GIB:.2f} GiB per rank per "
                      f"micro-batch, {self.frozen_allgather_bytes_per_forward * accum / GIB:.2f} GiB per optimizer "
                      f"step ({accum:g} micro-batch(es))",
                      f"  keeping it outside costs {(self.frozen_bytes - self.frozen_inside_bytes) / GIB:.2f} GiB per "
                      f"rank and saves that all-gather traffic"]
        if self.host_build_bytes:
            lines += ["", "Host memory at start, per node (the model's fp32 weights while it is built; each process "
                          "adds its framework's own)",
                      f"  {'every rank builds it (build_on_every_rank)':<44}{g(self.host_bytes_per_node_every_rank)}"
                      f"   {self.gpus_per_node} rank(s) x 4 B x (P + F)",
                      f"  {'rank 0 builds it (default)':<44}{g(self.host_bytes_per_node_rank0)}"
                      f"   4 B x (P + F) on node 0; other ranks receive a weightless skeleton"]
        if self.notes:
            lines += ["", "Notes"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def estimate(counts: ParameterCounts, cfg: Config, gpus_per_node: int, nodes: int = 1, *,
             gpu_memory_gib: float = 80.0, text_tokens: int | None = None, config_name: str = "",
             origins: dict[str, str] | None = None, vocab_before: int = 0, tokenizer_length: int = 0,
             tokenizer_assumed: bool = False, cross_check: bool = True) -> MemoryPlan:
    """Pure arithmetic: per-rank bytes for `counts` on `gpus_per_node x nodes` ranks (see the module docstring)."""
    if gpus_per_node < 1 or nodes < 1:
        raise ConfigError(f"--gpus and --nodes must be at least 1, got {gpus_per_node} and {nodes}")
    world = gpus_per_node * nodes
    bf16 = cfg.model.precision != "fp32"  # "auto" is bf16 on GPU, which is what is planned for
    vb = 2 if bf16 else 4
    P, F = counts.trainable, counts.frozen
    ds = getattr(cfg, "deepspeed", None)  # sizes as the DeepSpeed strategy passes them to DeepSpeed
    prefetch = int(getattr(ds, "stage3_prefetch_bucket_size", 50_000_000))
    max_live = int(getattr(ds, "stage3_max_live_parameters", 1_000_000_000))
    reduce_bucket = int(getattr(ds, "reduce_bucket_size", 500_000_000))
    contiguous = bool(getattr(ds, "contiguous_gradients", True))
    sub_group = int(getattr(ds, "sub_group_size", DEFAULT_SUB_GROUP_SIZE))

    b = cfg.train.micro_batch_size
    # Every camera in data.cameras adds one image's tokens to the prefix and runs the encoders once more;
    # a state projection adds one token.
    data_cfg = getattr(cfg, "data", None)
    cameras = len(getattr(data_cfg, "cameras", None) or ["primary"])
    image_tokens = counts.image_tokens * cameras + (1 if int(getattr(cfg.model, "state_dim", 0) or 0) else 0)
    if text_tokens is None:
        text_tokens = cfg.data.max_length  # the longest text a sample may have; image tokens come on top
    s = image_tokens + text_tokens
    scores = cfg.model.attn_implementation == "eager"
    llm = counts.llm_shape
    answer = min(answer_tokens_per_sample(cfg), text_tokens)

    enc_act = {n: stack_activation_bytes(sh, sh.tokens_per_sample, b * cameras, checkpointing=False, scores=scores,
                                         value_bytes=vb) for n, sh in counts.encoder_shapes.items()}
    enc_ckpt = {n: stack_activation_bytes(sh, sh.tokens_per_sample, b * cameras, checkpointing=True, scores=scores,
                                          value_bytes=vb) for n, sh in counts.encoder_shapes.items()}
    pw = counts.projector_widths or [0]
    proj_values = 2 * pw[0] + 2 * sum(pw[1:-1]) + pw[-1]
    notes: list[str] = []
    if cfg.train.strategy != "deepspeed":
        notes.append(f"train.strategy is {cfg.train.strategy!r}: this plan is for ZeRO-3; the single-process "
                     f"strategy keeps the same 16 B/param on one GPU (fp32 weights + grads + Adam), without "
                     f"ZeRO buffers")
    accum: int | None = None
    batch_error = None
    try:
        accum = resolve_accumulation(cfg.train, world)
    except ConfigError as e:
        batch_error = str(e)
    if tokenizer_assumed:
        notes.append("no tokenizer folder: assumed it holds vocab_size tokens, plus what load_tokenizer adds (2 "
                     "prompt tokens, and a pad token when the config has none); a tokenizer smaller than "
                     "vocab_size (Qwen2.5's) means no resize, 64 x hidden fewer parameters")
    if not scores:
        notes.append("attention scores are not stored (flash/SDPA); with eager attention add 5as/h x sbh per layer")

    plan = MemoryPlan(
        config=config_name, gpus_per_node=gpus_per_node, nodes=nodes, world=world,
        gpu_memory_bytes=int(gpu_memory_gib * GIB), precision="bf16" if bf16 else "fp32", counts=counts,
        origins=dict(origins or {}), vocab_before=vocab_before, tokenizer_length=tokenizer_length,
        tokenizer_assumed=tokenizer_assumed, micro_batch=b, global_batch=cfg.train.global_batch_size,
        text_tokens=text_tokens, seq_len=s,
        answer_tokens=answer, grad_accumulation=accum, gradient_checkpointing=cfg.model.gradient_checkpointing,
        scores_stored=scores,
        params_bytes=vb * P / world,
        master_bytes=(4 * P / world) if bf16 else 0.0,
        adam_bytes=8 * P / world,
        grads_bytes=(4 if bf16 and getattr(ds, "grad_accum_dtype", "fp32") == "fp32" else vb) * P / world,
        frozen_bytes=vb * F,
        frozen_inside_bytes=vb * F / world,
        frozen_allgather_bytes_per_forward=vb * F * (world - 1) / world,
        gathered_bytes=vb * min(max_live, counts.largest_layer + prefetch, P),
        persistent_bytes=vb * counts.persistent,
        reduce_bucket_bytes=((4 if bf16 and getattr(ds, "communication_data_type", "fp32") == "fp32" else vb)
                             * reduce_bucket if contiguous else 0.0),
        step_fp32_grad_bytes=(4 * min(sub_group, math.ceil(P / world))) if bf16 else 0.0,
        llm_act_bytes=stack_activation_bytes(llm, s, b, checkpointing=False, scores=scores, value_bytes=vb),
        llm_act_ckpt_bytes=stack_activation_bytes(llm, s, b, checkpointing=True, scores=scores, value_bytes=vb),
        encoder_act_bytes=enc_act, encoder_act_ckpt_bytes=enc_ckpt,
        projector_act_bytes=b * image_tokens * proj_values * vb,
        logits_bytes=b * answer * counts.vocab * (vb + (4 if bf16 else 0) + 4),
        deepspeed_estimate_bytes=(deepspeed_zero3_estimate(P, counts.largest_layer, gpus_per_node, nodes)
                                  if cross_check else None),
        notes=notes, batch_error=batch_error,
        host_build_bytes=4.0 * (P + F),
    )
    return plan


def _short_path(path: str) -> str:
    """A path relative to the working directory when it is inside it (shorter in the table)."""
    if not path or not os.path.isabs(path.split(" ")[0]):
        return path
    rel = os.path.relpath(path.split(" ")[0])
    return path if rel.startswith("..") else rel + path[len(path.split(" ")[0]):]


def _min_gpus(counts: ParameterCounts, cfg: Config, gpu_memory_gib: float, text_tokens: int | None) -> int | None:
    for world in range(1, MAX_WORLD + 1):
        p = estimate(counts, cfg, world, 1, gpu_memory_gib=gpu_memory_gib, text_tokens=text_tokens,
                     cross_check=False)
        if p.fits:
            return world
    return None


def plan_memory(cfg: Config, gpus: int = 1, nodes: int = 1, *, gpu_memory_gib: float = 80.0,
                text_tokens: int | None = None, config_path: str | os.PathLike | None = None) -> MemoryPlan:
    """Build `cfg`'s model on the meta device and plan its per-rank memory on `gpus x nodes` ranks.

    `text_tokens` defaults to the longest text the config allows
    (data.max_length; the image tokens come on top); `config_path` is used to find
    architecture JSONs named relative to the config file and in the output.
    """
    config_dir = Path(config_path).resolve().parent if config_path else None
    meta = build_meta_model(cfg.model, config_dir)
    threshold = int(getattr(getattr(cfg, "deepspeed", None), "stage3_param_persistence_threshold", 100_000))
    counts = count_parameters(meta, threshold)
    plan = estimate(counts, cfg, gpus, nodes, gpu_memory_gib=gpu_memory_gib, text_tokens=text_tokens,
                    config_name=str(config_path or "<config>"), origins=meta.origins,
                    vocab_before=meta.vocab_before, tokenizer_length=meta.tokenizer_length,
                    tokenizer_assumed=meta.tokenizer_assumed)
    if meta.tokenizer_error:
        plan.notes.append(f"training would stop at the tokenizer: {meta.tokenizer_error}")
    plan.min_gpus = _min_gpus(counts, cfg, gpu_memory_gib, text_tokens)
    return plan


__all__ = ["MemoryPlan", "MetaModel", "ParameterCounts", "TransformerShape", "build_meta_model", "count_parameters",
           "deepspeed_zero3_estimate", "estimate", "layer_activation_bytes", "plan_memory", "resolve_arch",
           "stack_activation_bytes"]
