"""The typed configuration of a vla-scale run.

One frozen-in-shape tree of dataclasses. YAML presets in `configs/` and
dotted command-line overrides are merged onto it by `vla_scale.config.load`;
anything not declared here is an error at load time. Field comments are the
reference documentation of every key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union


@dataclass
class EncoderConfig:
    # A name for logs, checkpoints and the export (unique within the model).
    name: str = "encoder"
    # Local Hugging Face folder of a vision model (SigLIP, DINOv2, CLIP...).
    # null: a copy of the source VLM's own vision tower (siamese layout).
    path: Optional[str] = None
    # false: frozen (outside the optimizer and the ZeRO engine); true: fine-tuned.
    trainable: bool = False
    # Which hidden state to use: an index into the encoder's hidden states
    # (embeddings first). -2, the default, is the output of the
    # second-to-last layer, as in LLaVA and Prismatic.
    feature_layer: int = -2
    # Apply the encoder's final layer norm to that hidden state (PaliGemma
    # uses the last layer with its post-layernorm: feature_layer -1, true).
    post_layernorm: bool = False
    # "patch": drop prefix tokens (CLS, registers), keep patch tokens;
    # "full": keep every token; "auto": what the source VLM does for its own
    # tower (LLaVA's vision_feature_select_strategy), "patch" otherwise.
    select: str = "auto"
    # Architecture config (a Hugging Face config.json) used by `vla-scale plan`
    # when `path` is not a local folder yet, so memory can be planned before the
    # weights are downloaded: a JSON file, or the name of one in configs/arch/.
    arch: Optional[str] = None


@dataclass
class ProjectorConfig:
    # "source": start from the source VLM's projector (the first weight is
    # split over the encoders, [W/k | ... | W/k], so that k identical copies
    # reproduce the source VLM exactly at step 0); "random": a new projector.
    init: str = "source"
    # Layer widths between the concatenated features and the LLM width, for
    # init: random (Prismatic's fused GELU MLP for 2176 -> 4096 is [8704, 4096]).
    hidden_dims: List[int] = field(default_factory=list)
    # Activation between layers: "gelu" (erf) or "gelu_tanh".
    activation: str = "gelu"
    # Use the fused Triton concat-projection kernel on CUDA (reference elsewhere).
    fused_kernel: bool = True


@dataclass
class ModelConfig:
    # Local folder of the source VLM (a LLaVA-family or PaliGemma checkpoint).
    # Empty with source_type "parts".
    source: str = ""
    # "auto" (from the folder's config.json), "llava", "paligemma", or "parts"
    # (separate encoder folders + an LLM folder + a new projector, Prismatic-style).
    source_type: str = "auto"
    # parts mode: local folder of the causal LM (Llama, Qwen2, Gemma...).
    llm: Optional[str] = None
    # Local tokenizer folder; default: the source VLM's (or the LLM's) folder.
    tokenizer: Optional[str] = None
    # Architecture config used by `vla-scale plan` when the weights folder does not
    # exist locally: the source VLM's config.json (llava/paligemma) or the LLM's
    # (parts); a JSON file, or the name of one in configs/arch/.
    llm_arch: Optional[str] = None
    # The vision encoders, features concatenated per patch in this order.
    encoders: List[EncoderConfig] = field(default_factory=list)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    # Square input resolution in pixels (every encoder sees the same image).
    image_size: int = 224
    # "auto": flash_attention_2 when flash_attn imports and a GPU is present, else sdpa.
    attn_implementation: str = "auto"
    # Activation checkpointing of the LLM's decoder layers.
    gradient_checkpointing: bool = False
    # "auto": bf16 on GPU, fp32 on CPU; or "fp32" / "bf16".
    precision: str = "auto"
    # Width of the robot state fed through a trainable projection as one prefix token after the
    # cameras (data.state: projection needs it equal to the state's size); 0: no state projection.
    state_dim: int = 0


@dataclass
class ActionConfig:
    # Number of action dimensions (7: delta xyz, delta roll/pitch/yaw, gripper).
    dim: int = 7
    # Actions per prediction (1: no chunking, as in the paper's release).
    chunk: int = 1
    # "string" (the paper's) or "bins" (OpenVLA's 256-bin baseline, for ablations).
    tokenizer: str = "string"
    # String style: "fixed" (+0.0312 -0.5000 ...) or "vla-plus" (the release's text).
    style: str = "fixed"
    decimals: int = 4
    # Dimensions kept as they are (not normalized), e.g. the 0/1 gripper.
    keep_dims: List[int] = field(default_factory=lambda: [6])


@dataclass
class SourceConfig:
    # A co-training data source.
    name: str = "robot"
    # "robot", "vqa", "spatial" or "affordance".
    task: str = "robot"
    # "synthetic" (the built-in generator, written as shards into the run folder),
    # a local folder of MDS shards written by `vla-scale convert`, or the URL of one
    # on object storage (s3://bucket/ds, gs://..., hf://..., azure://...; cached locally
    # in data.storage.cache_dir).
    path: str = "synthetic"
    # Share of every global batch (weights are normalized to sum to 1; each global
    # batch holds exactly round(weight x batch) samples of this source).
    weight: float = 1.0
    # Robot sources: action statistics (q01/q99/mask). null: PATH/stats.json, or
    # computed in one pass at start and saved in the run folder.
    stats: Optional[str] = None
    # Robot sources: dimensions kept raw (mask false in the stats, e.g. actions.keep_dims)
    # must hold values in [-1, 1], or starting is an error. A gripper in other units
    # (e.g. 0-85) is mapped here instead: above this value -> 1, otherwise 0. The
    # policy then outputs 0/1 for it.
    binarize_threshold: Optional[float] = None


@dataclass
class SyntheticDataConfig:
    # Samples generated per source by the built-in synthetic co-training set.
    samples_per_source: int = 256
    # Image side of generated samples (resized to model.image_size).
    image_size: int = 32


@dataclass
class StorageConfig:
    # Node-local folder where shards of remote sources (s3://, gs://, hf://... any URL
    # mosaicml-streaming reads) are cached; one sub-folder per source and dataset version.
    # null: <TMPDIR>/vla-scale-shard-cache. Put it on local disk (NVMe), not on shared storage.
    cache_dir: Optional[str] = None
    # Most bytes the shard cache may hold ("200gb", "500mb" or a number); the least recently used
    # shards are evicted beyond it. null: no limit. streaming needs at least 4x the largest shard.
    cache_limit: Optional[str] = None
    # Hash checked on every shard before it is read (shards carry sha1 and xxh64 since they are
    # written with hashes): remote shards when downloaded, local ones the first time each process
    # opens them. null: no checks. Shards written without that hash are read unchecked (a warning).
    validate_hash: Optional[str] = "xxh64"
    # Seconds to wait for one shard download, and retries before a download is an error.
    download_timeout_s: float = 300.0
    download_retry: int = 2


@dataclass
class DataConfig:
    # Default mix is the paper's: robot 0.50, VQA 0.25, spatial 0.125, affordance 0.125.
    sources: List[SourceConfig] = field(
        default_factory=lambda: [
            SourceConfig(name="robot", task="robot", weight=0.5),
            SourceConfig(name="vqa", task="vqa", weight=0.25),
            SourceConfig(name="spatial", task="spatial", weight=0.125),
            SourceConfig(name="affordance", task="affordance", weight=0.125),
        ]
    )
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    # Longest text sequence in tokens (image tokens not counted).
    max_length: int = 512
    # Samples longer than max_length: "truncate" (later turns first, then the question's
    # end; an answer is cut only when it alone does not fit), "drop" (the sample keeps its
    # batch slot with no answer tokens, so it adds nothing to the loss) or "error". Either
    # way the batch keys `truncated` / `dropped` flag them. A robot action is never cut:
    # max_length too short for one is an error at start.
    overlong: str = "truncate"
    # OpenVLA-style image augmentation (random resized crop + colour jitter),
    # deterministic per (seed, sample, epoch); both encoders see the same image.
    augment: bool = False
    # DataLoader worker processes per rank (decode, augment, tokenize, collate).
    num_workers: int = 0
    # mosaicml-streaming's canonical node count: keep it fixed for the life of a run
    # so that resuming on a different number of GPUs neither repeats nor skips samples.
    num_canonical_nodes: int = 1
    # Shuffle seed of the sample order (the augmentation seed is train.seed).
    shuffle_seed: int = 0
    # Held-out data for validation (train.val_every): each entry names a training source
    # (`name`, whose task and action statistics it shares) and a shard folder of held-out
    # episodes or records; path "synthetic" generates a held-out set with another seed.
    val_sources: List[SourceConfig] = field(default_factory=list)
    # At most this many samples of each validation source are read (once) and evaluated.
    val_samples: int = 32
    # Cameras the model sees, in prefix order: "primary" is the shards' `image` column, any other
    # name N the column `image_N` (old shards' `wrist_image` serves as "wrist"). Each camera adds
    # its patch tokens to the prefix; a robot source lacking a listed camera is an error, VL
    # samples carry the primary only (the others are masked out, as is the image of a text-only
    # VL sample).
    cameras: List[str] = field(default_factory=lambda: ["primary"])
    # The robot's proprioceptive state (the shards' `state` column), normalised to [-1, 1] with its
    # q01/q99 statistics: "none"; "text" (pi0.5-style: each value discretised into state_bins bins,
    # written as integers in the robot prompt); "projection" (a trainable linear map to one prefix
    # token; set model.state_dim to the state's size).
    state: str = "none"
    state_bins: int = 256
    # Where shards of remote sources are cached, and how shards are checked (data.storage.*).
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass
class TrainConfig:
    steps: int = 1000
    # Samples per optimizer step over all ranks.
    global_batch_size: int = 32
    # Samples per forward/backward on one rank.
    micro_batch_size: int = 32
    # Micro-batches per rank per optimizer step: "auto" derives it from the world size,
    # global_batch_size / (micro_batch_size x ranks), so a config runs on any world size that
    # divides; an int must agree with the two sizes and the world size (vla_scale.train.batching).
    gradient_accumulation: Union[int, str] = "auto"
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    # "cosine" (after linear warmup) or "constant".
    schedule: str = "cosine"
    # Final LR as a fraction of lr (cosine).
    min_lr_ratio: float = 0.0
    # Max global gradient norm; 0 disables clipping.
    grad_clip: float = 1.0
    seed: int = 0
    # "single" (one process) or "deepspeed" (ZeRO-3).
    strategy: str = "single"
    # Save every N steps (and at the end); 0: only at the end.
    checkpoint_every: int = 2500
    keep_last_k: int = 3
    log_every: int = 1
    # Validate every N steps and at the end (data.val_sources); 0: never. Logs per-source
    # loss, the robot action L1 per dimension and gripper accuracy of constrained greedy
    # decoding beside the mean-action baseline, and the vision-reliance gap (the same
    # metrics with each image swapped for another validation sample's).
    val_every: int = 0
    # On a NaN/inf loss: "skip" the step (warn and count) or "stop" (save, then fail).
    on_nonfinite: str = "skip"
    # Exit with every thread's traceback if one step (with its checkpoint save) takes
    # longer than this many seconds, e.g. a collective waiting for a dead rank; 0: off.
    # The elastic launcher then restarts the run from its latest checkpoint. Unset (null):
    # 1200 s under SLURM (SLURM_JOB_ID set), off elsewhere (train.distributed.resolve_hang_timeout).
    hang_timeout_s: Optional[float] = None
    # Dense peak FLOP/s of one device, for MFU (e.g. 989e12 for an H100 in bf16); null: the
    # bf16 table of known GPUs (vla_scale.train.metrics), none on CPU (MFU not reported).
    peak_flops: Optional[float] = None
    # Synchronize the GPU around each timed phase of a step (forward, backward, optimizer,
    # communication) so the logged breakdown is device time; costs throughput. `vla-scale
    # profile` turns it on; off, no extra host syncs are made.
    sync_timing: bool = False
    tensorboard: bool = True
    progress: bool = True


@dataclass
class DeepSpeedConfig:
    # ZeRO stage (3: parameters, gradients and optimizer state partitioned).
    stage: int = 3
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    # Gather 16-bit weights on save (needed for save_16bit_model; off: zero_to_fp32 consolidates).
    stage3_gather_16bit_weights_on_model_save: bool = False
    # Under bf16: the dtype gradients are accumulated in across micro-batches (DeepSpeed's
    # data_types.grad_accum_dtype; the partitioned gradient buffer) and the dtype they are
    # reduce-scattered in (communication_data_type). fp32 (the default) costs 2 more bytes
    # per trainable parameter / world size and twice the gradient traffic, and keeps bf16's
    # 8-bit mantissa out of sums over many micro-batches and ranks. fp32 runs use fp32 throughout.
    grad_accum_dtype: str = "fp32"
    # false: rank 0 alone reads the checkpoints and builds the model on the host; the other
    # ranks get its module skeleton without weights, the frozen encoders straight onto their
    # device and their ZeRO-3 partitions from rank 0's broadcast. true: every rank builds the
    # whole model on the host first (ranks per node x 4 B/parameter of host memory; a fallback
    # for a model that cannot be sent as a skeleton).
    build_on_every_rank: bool = False
    communication_data_type: str = "fp32"
    # A user's DeepSpeed JSON, merged over the generated config (its keys win).
    config_file: Optional[str] = None


@dataclass
class RunConfig:
    # Where checkpoints, metrics.jsonl, TensorBoard logs and config.yaml go.
    output_dir: str = "runs/default"
    name: str = "vla"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    actions: ActionConfig = field(default_factory=ActionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
