"""From configured sources to this rank's micro-batches for one optimizer step.

    sources (MDS shard folders, or their URLs on object storage read through a node-local
             cache (vla_scale.data.storage); "synthetic" ones are generated into the run folder)
      -> one mosaicml-streaming StreamingDataset with a Stream per source,
         stratified batching: every global batch holds exactly
         round(weight x batch) samples of each source
      -> per-sample processing in loader workers: decode, augment, normalise the
         action with its source's statistics, prompt + labels
      -> collate (right padding) -> split into micro-batches

`CoTrainingLoader` is the seam the trainer sees: `next_step()` returns this
rank's micro-batches for one optimizer step; `state_dict()` /
`load_state_dict()` resume at exactly the next sample, also on a different
number of ranks (streaming's sample order depends on the global batch and
`num_canonical_nodes`, which stay fixed, not on the world size).

Every rank's slice is mixed: the `rank_mixed` batching method
(`vla_scale.data.streaming_dataset`) takes streaming's stratified global batch
(exactly round(weight x batch) samples per source, largest-remainder rounding,
fixed for the run) and places its samples so that each rank's slice, and each
micro-batch of it, holds floor or ceil of its share of every source. Ranks
then carry similar sequence lengths, and the objective does not depend on the
world size (the trainer normalises the loss by the global answer-token count).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_scale.actions import ActionNormalizer
from vla_scale.actions.normalizer import binarize, check_raw_dims
from vla_scale.config.schema import Config, SourceConfig
from vla_scale.data.augment import augment_image, center_crop
from vla_scale.data.camera_images import camera_column
from vla_scale.data.chunks import CHUNK_KEY, VALID_KEY
from vla_scale.data.images import to_pixels
from vla_scale.data.mixture import batch_counts, smallest_batch_including
from vla_scale.data.prompts import PromptBuilder
from vla_scale.data.schema import ROBOT_TASK, STATS_FILE, camera_image, optional_array, robot_sample, vl_sample
from vla_scale.data.state import STATE_KEY, StateNormalizer, state_text
from vla_scale.data.storage import ShardLocation, resolve_source
from vla_scale.data.streaming_compat import import_streaming
from vla_scale.data.synthetic import make_samples
from vla_scale.errors import DataError
from vla_scale.models.vla import IGNORE_INDEX
from vla_scale.train.batching import resolve_accumulation

log = logging.getLogger(__name__)

_WAIT_S = float(os.environ.get("VLA_SCALE_DATA_WAIT_S", "1800"))


def _wait_for(path: Path, what: str) -> None:
    """Ranks other than 0 wait for a file rank 0 writes atomically (no process group needed)."""
    deadline = time.monotonic() + _WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise DataError(f"timed out after {_WAIT_S:.0f} s waiting for rank 0 to write {what} ({path})")
        time.sleep(0.2)


# -- sources -----------------------------------------------------------------
def synthetic_dir(cfg: Config, index: int) -> Path:
    return Path(cfg.run.output_dir) / "data" / cfg.data.sources[index].name


def write_synthetic_source(cfg: Config, index: int, out: Path, held_out: bool = False) -> None:
    """The built-in synthetic set of one source, as real MDS shards (deterministic in the seed).

    `held_out`: a validation set of the same source, from a seed training never uses.
    """
    from vla_scale.data.writer import ShardWriter

    src = cfg.data.sources[index]
    seed = cfg.train.seed + index + (10_000 if held_out else 0)
    n = cfg.data.val_samples if held_out else cfg.data.synthetic.samples_per_source
    samples = make_samples(src.task, n, seed=seed, image_size=cfg.data.synthetic.image_size,
                           action_dim=cfg.actions.dim, chunk=cfg.actions.chunk)
    with ShardWriter(out, size_limit=1 << 20) as w:
        for i, s in enumerate(samples):
            where = f"synthetic source '{src.name}' sample {i}"
            if s["task"] == ROBOT_TASK:
                w.write(robot_sample(image=s["image"], instruction=s["instruction"], action=s["action"],
                                     dataset=f"synthetic-{src.name}", episode=s["episode"], step=s["step"],
                                     where=where), where)
            else:
                w.write(vl_sample(image=s["image"], turns=[{"question": s["question"], "answer": s["answer"]}],
                                  task=s["task"], dataset=f"synthetic-{src.name}", where=where), where)


def source_dirs(cfg: Config, rank: int = 0) -> list[ShardLocation]:
    """Where every source's shards are read (a local folder, or a remote URL and its node-local cache);
    rank 0 generates synthetic sources, the others wait for them."""
    out = []
    st = cfg.data.storage
    for i, src in enumerate(cfg.data.sources):
        path = src.path
        if src.path == "synthetic":
            d = synthetic_dir(cfg, i)
            if rank == 0 and not (d / "index.json").is_file():
                write_synthetic_source(cfg, i, d)
            _wait_for(d / "index.json", f"synthetic source '{src.name}'")
            path = str(d)
        out.append(resolve_source(path, name=src.name, cache_dir=st.cache_dir, timeout=st.download_timeout_s,
                                  what=f"data.sources.{i}.path"))
    return out


def source_stats(cfg: Config, dirs: list[ShardLocation], rank: int = 0) -> dict[str, dict[str, Any]]:
    """Action statistics per robot source: `stats:` if set, else PATH/stats.json (also on a remote),
    else computed once."""
    from vla_scale.data.stats import load_stats, read_folder_stats, stats_for_shards

    out: dict[str, dict[str, Any]] = {}
    for i, (src, loc) in enumerate(zip(cfg.data.sources, dirs)):
        if src.task != ROBOT_TASK:
            continue
        d = loc.remote or loc.local
        found = None if src.stats else read_folder_stats(d)
        if src.stats:
            out[src.name] = load_stats(src.stats)
        elif found is not None:
            out[src.name] = found
        else:
            # Never write into a user's dataset folder: computed statistics go to the run folder
            # (synthetic shards live in the run folder already).
            target = loc.local / STATS_FILE if src.path == "synthetic" else (
                Path(cfg.run.output_dir) / "stats" / f"{src.name}.json")
            if rank == 0 and not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                log.info("computing action statistics of source '%s' (%s)", src.name, d)
                stats_for_shards(d, out=target, keep_dims=cfg.actions.keep_dims)
            _wait_for(target, f"statistics of source '{src.name}'")
            out[src.name] = load_stats(target)
        dim = len(out[src.name]["q01"])
        if dim != cfg.actions.dim:
            raise DataError(f"source '{src.name}': its actions have {dim} dimensions but actions.dim is "
                            f"{cfg.actions.dim}")
        check_raw_dims(out[src.name], src.binarize_threshold, f"data.sources.{i} ('{src.name}')")
    if not out:
        raise DataError("data.sources: at least one robot source is needed (action statistics come from it)")
    if cfg.data.state != "none":
        add_state_stats(cfg, dirs, out, rank)
    return out


def add_state_stats(cfg: Config, dirs: list[ShardLocation], stats: dict[str, dict[str, Any]], rank: int = 0) -> None:
    """Put the state's q01/q99 under stats[source]["state"] (data.state text|projection): from the source's
    statistics when they hold them, else computed once from the (local) shards into the run folder."""
    from vla_scale.data.state import compute_state_stats
    from vla_scale.data.stats import load_stats, write_stats

    for src, loc in zip(cfg.data.sources, dirs):
        if src.name not in stats or STATE_KEY in stats[src.name]:
            continue
        if getattr(loc, "remote", None):
            raise DataError(f"source '{src.name}' ({loc.remote}): data.state={cfg.data.state!r} needs the state's "
                            f"statistics; computing them reads local shards only: give the source a stats file "
                            f"with a 'state' entry ({{q01, q99}}) in data.sources.N.stats")
        target = Path(cfg.run.output_dir) / "stats" / f"{src.name}.state.json"
        if rank == 0 and not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_stats(compute_state_stats(getattr(loc, "local", loc)), target)
        _wait_for(target, f"state statistics of source '{src.name}'")
        stats[src.name] = {**stats[src.name], STATE_KEY: load_stats(target)}
    for name, s in stats.items():
        dim = len(s[STATE_KEY]["q01"])
        if cfg.data.state == "projection" and dim != cfg.model.state_dim:
            raise DataError(f"source '{name}': its state has {dim} values but model.state_dim is "
                            f"{cfg.model.state_dim}; set model.state_dim={dim}")


# -- per-sample processing (runs in loader workers) ---------------------------
class SampleProcessor:
    """Decode, augment, normalise, tokenise and collate one rank batch. Picklable for workers.

    Over-long samples (`data.overlong`) reach the metrics through the batch: `truncated` and
    `dropped` are 0/1 per sample. A dropped sample keeps its slot (BOS alone, no answer
    tokens), because a collate function cannot fetch a replacement from the stream and the
    global batch, and with it the resume position, must not change. The counters
    `truncated_count` / `dropped_count` here see only this process's samples (loader workers
    hold their own copies), so the trainer should sum the batch keys, not read these.
    """

    def __init__(self, cfg: Config, prompts: PromptBuilder, stats: dict[str, dict[str, Any]],
                 source_of_stream: list[str]):
        self.image_size = cfg.model.image_size
        self.augment = cfg.data.augment
        # Set (with augment off) to preprocess robot frames as the exported policy does (validation).
        self.center_crop_scale: float | None = None
        self.seed = cfg.train.seed
        self.chunk = cfg.actions.chunk
        self.dim = cfg.actions.dim
        self.prompts = prompts
        self.normalizers = {name: ActionNormalizer.from_stats(s) for name, s in stats.items()}
        self.source_of_stream = source_of_stream  # stream index -> source name
        self.source_index = {name: i for i, name in enumerate(source_of_stream)}
        self.thresholds = {src.name: src.binarize_threshold for src in cfg.data.sources}
        self.overlong = cfg.data.overlong
        self.truncated_count = self.dropped_count = 0
        self.cameras = list(cfg.data.cameras)
        self.state_mode, self.state_bins = cfg.data.state, cfg.data.state_bins
        self.state_normalizers = ({name: StateNormalizer.from_stats(s[STATE_KEY]) for name, s in stats.items()}
                                  if self.state_mode != "none" else {})
        state_dim = max((n.dim for n in self.state_normalizers.values()), default=0)
        # The widest state text: every value in the last bin (digits are single tokens).
        worst_state = state_text(np.ones(state_dim), self.state_bins) if self.state_mode == "text" else None
        prompts.check_robot_fits((self.dim,) if self.chunk == 1 else (self.chunk, self.dim), worst_state)

    def sample(self, s: dict[str, Any]) -> dict[str, Any]:
        stream = int(s["_stream"])
        name = self.source_of_stream[stream]
        where = f"source '{name}' sample {int(s['_uid'])}"
        pixels, present = self.camera_pixels(s, where)
        valid_steps = None
        if s["task"] == ROBOT_TASK:
            action = np.asarray(s["action"], dtype=np.float32)
            if self.chunk > 1 and CHUNK_KEY in s:  # built from the following steps (vla_scale.data.chunks)
                action = np.asarray(s[CHUNK_KEY], dtype=np.float32)
                valid_steps = int(np.asarray(s[VALID_KEY]).sum())
            expect = (self.dim,) if self.chunk == 1 else (self.chunk, self.dim)
            if action.shape != expect:
                raise DataError(f"{where}: action has shape {action.shape}, the config expects {expect} "
                                f"(actions.dim={self.dim}, actions.chunk={self.chunk})")
            if not np.all(np.isfinite(action)):
                raise DataError(f"{where}: non-finite action {action}")
            normalizer = self.normalizers[name]
            if self.thresholds.get(name) is not None:
                action = binarize(action, normalizer.mask, self.thresholds[name])
            normalized = normalizer.normalize(action)
            raw = ~normalizer.mask & (np.abs(normalized) > 1.0).reshape(-1, self.dim).any(0)
            if raw.any():  # statistics without min/max could not be checked at start
                k = int(np.flatnonzero(raw)[0])
                raise DataError(f"{where}: action dimension {k} is kept raw but holds "
                                f"{normalized.reshape(-1, self.dim)[:, k].tolist()}, outside [-1, 1]; set "
                                f"binarize_threshold on the source or normalise the dimension")
        state, state_txt = None, None
        if self.state_mode != "none" and s["task"] == ROBOT_TASK:
            raw_state = optional_array(s.get("state"))
            if raw_state is None:
                raise DataError(f"{where}: data.state={self.state_mode!r} but the sample has no state; convert the "
                                f"dataset with its state key, or set data.state=none")
            state = self.state_normalizers[name].normalize(raw_state, where)
            state_txt = state_text(state, self.state_bins) if self.state_mode == "text" else None
        try:
            if s["task"] == ROBOT_TASK:
                tok = self.prompts.build_robot(s["instruction"], normalized, self.overlong, valid_steps, state_txt)
            else:
                tok = self.prompts.build_vl_turns(list(s["turns"]), self.overlong)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if tok.truncated or tok.dropped:
            if not (self.truncated_count or self.dropped_count):
                log.warning("%s: longer than data.max_length=%d, %s (data.overlong; counted in the batch key "
                            "'%s')", where, self.prompts.max_length, "dropped" if tok.dropped else "truncated",
                            "dropped" if tok.dropped else "truncated")
            self.truncated_count += tok.truncated
            self.dropped_count += tok.dropped
        out = {"input_ids": tok.input_ids, "labels": tok.labels, "choice": tok.choice, "source": stream,
               "pixels": pixels, "image_mask": present, "sample_id": int(s["_uid"]), "truncated": tok.truncated,
               "dropped": tok.dropped}
        if self.state_mode == "projection":
            dim = next(iter(self.state_normalizers.values())).dim
            out["state"] = torch.from_numpy(state) if state is not None else torch.zeros(dim)
            out["state_mask"] = state is not None
        return out

    def camera_pixels(self, s: dict[str, Any], where: str) -> tuple[torch.Tensor, list[bool]]:
        """Pixels of every camera in data.cameras ((3, H, W) for one, (C, 3, H, W) for several) and which
        the sample has. A robot sample must have them all; VL samples have the primary at most."""
        robot = s["task"] == ROBOT_TASK
        pixels, present = [], []
        for k, cam in enumerate(self.cameras):
            image = camera_image(s, cam, where)
            if image is None:
                if robot:
                    raise DataError(f"{where}: no camera {cam!r} (column {camera_column(cam)!r}) in this robot "
                                    f"sample, but data.cameras lists it")
                # uint8 like every present camera: one float image would promote a whole stacked batch to
                # float 0-255, which the encoders read as [0, 1] floats (see `collate`).
                pixels.append(torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8))
                present.append(False)
                continue
            # Robot frames only: VL answers may hold image coordinates that a crop would falsify. Each camera
            # draws its own crop (the primary keeps the seed it always had).
            if self.augment and robot:
                rng = np.random.default_rng([self.seed, int(s["_uid"]), int(s["_epoch"])] + ([k] if k else []))
                image = augment_image(image, rng)
            elif self.center_crop_scale is not None and robot:
                image = center_crop(image, self.center_crop_scale)  # evaluation: what the policy sees
            pixels.append(to_pixels(image, self.image_size))
            present.append(True)
        return (pixels[0] if len(pixels) == 1 else torch.stack(pixels)), present

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate([self.sample(s) for s in batch], self.prompts.tokenizer.pad_token_id)


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids (pad_id), labels (-100) and attention masks; stack pixels; 0/1 flags per sample."""
    longest = max(len(s["input_ids"]) for s in samples)
    b = len(samples)
    ids = torch.full((b, longest), pad_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, longest), dtype=torch.long)
    choice = torch.zeros((b, longest), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
        choice[i, :n] = torch.from_numpy(np.asarray(s["choice"], dtype=bool)) if s.get("choice") is not None \
            else labels[i, :n] != IGNORE_INDEX
    extra = {}
    if "state" in samples[0]:  # data.state: projection
        extra = {"state": torch.stack([s["state"] for s in samples]),
                 "state_mask": torch.tensor([bool(s["state_mask"]) for s in samples])}
    dtypes = {s["pixels"].dtype for s in samples}
    if dtypes != {torch.uint8}:
        # torch.stack would silently promote uint8 pixels to float 0-255, which the vision encoders take for
        # [0, 1] floats (models/vision.py): a batch must not change how its images are read.
        raise DataError(f"pixels must be uint8 (3, H, W) or (C, 3, H, W) in every sample of a batch, got "
                        f"{sorted(str(d) for d in dtypes)}")
    masks = [s.get("image_mask") or [True] for s in samples]
    if any(len(m) > 1 or not all(m) for m in masks):  # several cameras, or a sample without an image
        extra["image_mask"] = torch.tensor(masks, dtype=torch.bool)
    return {**extra, "pixel_values": torch.stack([s["pixels"] for s in samples]), "input_ids": ids,
            "attention_mask": mask, "labels": labels, "choice_mask": choice,
            "source": torch.tensor([s["source"] for s in samples]),
            "sample_id": torch.tensor([s.get("sample_id", -1) for s in samples]),
            "truncated": torch.tensor([int(s.get("truncated", False)) for s in samples]),
            "dropped": torch.tensor([int(s.get("dropped", False)) for s in samples])}


def split_micro_batches(batch: dict[str, torch.Tensor], micro: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive micro-batches, each trimmed to its own longest sequence."""
    out = []
    for k in range(0, batch["input_ids"].shape[0], micro):
        mb = {key: v[k:k + micro] for key, v in batch.items()}
        longest = int(mb["attention_mask"].sum(1).max())
        for key in ("input_ids", "attention_mask", "labels", "choice_mask"):
            if key in mb:
                mb[key] = mb[key][:, :longest]
        out.append(mb)
    return out


# -- the loader ---------------------------------------------------------------
def _check_world(rank: int, world_size: int) -> None:
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    env_rank = int(os.environ.get("RANK", "0"))
    if (env_rank, env_world) != (rank, world_size):
        raise DataError(f"data loader for rank {rank}/{world_size} but the environment says "
                        f"RANK={env_rank} WORLD_SIZE={env_world}; streaming partitions by the environment")


def mixture_counts(cfg: Config) -> dict[str, int]:
    """Samples per global batch of each source in use (weight 0 disables a source; one that rounds to 0 is an error)."""
    sources: list[SourceConfig] = list(cfg.data.sources)
    weights = [s.weight for s in sources]
    batch = cfg.train.global_batch_size
    counts = batch_counts(weights, batch)
    for i, (src, c) in enumerate(zip(sources, counts)):
        if src.weight > 0 and c == 0:
            smallest = smallest_batch_including(weights, i, start=batch)
            raise DataError(f"data.sources.{i} ('{src.name}', weight {src.weight}) gets 0 samples in a global "
                            f"batch of {batch}; the smallest global batch that includes it is {smallest} "
                            "(or raise its weight; weight 0 disables a source)")
    return {src.name: c for src, c in zip(sources, counts) if c > 0}


def co_training_dataset(cfg: Config, dirs: list[ShardLocation] | list[Path], rank_batch: int):
    """One StreamingDataset over every source in use, `rank_mixed` batching; and the per-batch counts."""
    from vla_scale.data.chunks import ChunkedCoTrainingDataset
    from vla_scale.data.streaming_dataset import RANK_MIXED, CoTrainingDataset

    counts = mixture_counts(cfg)
    t = cfg.train
    st = cfg.data.storage
    folder = {src.name: d if isinstance(d, ShardLocation) else resolve_source(str(d), name=src.name, cache_dir=None)
              for src, d in zip(cfg.data.sources, dirs)}
    # Proportions are the exact per-batch counts over the batch, so stratified batching
    # reproduces them batch after batch.
    streams = [folder[name].stream(proportion=c / t.global_batch_size, validate_hash=st.validate_hash,
                                   download_timeout=st.download_timeout_s, download_retry=st.download_retry)
               for name, c in counts.items()]
    # actions.chunk > 1: robot samples carry the (T, D) chunk starting at them, read from the following
    # rows of the same episode (a pure function of the sample id, so resume and world-size changes hold).
    chunked = {"chunk": cfg.actions.chunk} if cfg.actions.chunk > 1 else {}
    try:
        dataset = (ChunkedCoTrainingDataset if chunked else CoTrainingDataset)(
            **chunked, validate_hash=st.validate_hash, cache_limit=st.cache_limit,
            streams=streams, batch_size=rank_batch, shuffle=True, shuffle_seed=cfg.data.shuffle_seed,
            batching_method=RANK_MIXED, micro_batch_size=t.micro_batch_size,
            num_canonical_nodes=cfg.data.num_canonical_nodes, replication=None,
            # streaming's own default, fixed here rather than at the first iteration, so the sample order
            # is fully determined by the config (and the work can be generated without iterating).
            shuffle_block_size=max(4_000_000 // cfg.data.num_canonical_nodes, 1 << 18),
        )
    except ValueError as e:
        if "ache limit" in str(e) or "cache usage" in str(e):
            raise DataError(f"data.storage.cache_limit={st.cache_limit!r}: {e}") from None
        raise
    return dataset, counts


class CoTrainingLoader:
    def __init__(self, cfg: Config, prompts: PromptBuilder, stats: dict[str, dict[str, Any]],
                 dirs: list[ShardLocation] | list[Path],
                 rank: int = 0, world_size: int = 1):
        t = cfg.train
        # Each rank's slice of a global batch is cut into `resolve_accumulation` micro-batches; a world
        # size that cannot divide the batch is an error naming the nearest valid settings.
        resolve_accumulation(t, world_size)
        _check_world(rank, world_size)
        streaming = import_streaming()
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.rank_batch = t.global_batch_size // world_size
        self.dataset, self.counts = co_training_dataset(cfg, dirs, self.rank_batch)
        self.source_names = list(self.counts)
        self._log_repeats()
        self.processor = SampleProcessor(cfg, prompts, stats, self.source_names)
        self.loader = streaming.StreamingDataLoader(
            self.dataset, batch_size=self.rank_batch, num_workers=cfg.data.num_workers,
            collate_fn=self.processor, drop_last=True, persistent_workers=False,
            prefetch_factor=2 if cfg.data.num_workers > 0 else None,
        )
        self._it = None
        self.epochs_started = 0

    def _log_repeats(self) -> None:
        sizes = [int(n) for n in self.dataset.samples_per_stream]
        for name, stream, size in zip(self.source_names, self.dataset.streams, sizes):
            per_epoch = int(stream.choose)
            if per_epoch > size:
                log.info("data source '%s' repeats: %d samples per epoch from %d (x%.2f)", name, per_epoch, size,
                         per_epoch / size)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for one optimizer step."""
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
                self.epochs_started += 1
            try:
                batch = next(self._it)
                return split_micro_batches(batch, self.cfg.train.micro_batch_size)
            except StopIteration:
                log.info("data: epoch finished; starting the next one (every source repeats)")
                self._it = None
        raise DataError("the data sources yield no complete batch: the dataset is smaller than one global batch")

    def state_dict(self) -> dict:
        return {"streaming": self.loader.state_dict(), "sources": self.source_names, "counts": self.counts,
                "global_batch_size": self.cfg.train.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if "streaming" not in state:
            raise DataError("cannot resume the data loader: the checkpoint's data state has no 'streaming' entry")
        if state.get("sources") != self.source_names or state.get("counts") != self.counts:
            raise DataError(f"cannot resume the data loader: the checkpoint mixes {state.get('counts')} per batch, "
                            f"this config mixes {self.counts}")
        if state.get("global_batch_size") != self.cfg.train.global_batch_size:
            raise DataError(f"cannot resume the data loader: global batch {state.get('global_batch_size')} in the "
                            f"checkpoint, {self.cfg.train.global_batch_size} now (it must stay fixed)")
        if state["streaming"] is not None:
            self.loader.load_state_dict(state["streaming"])
        # streaming adds the samples yielded since its iterator started to the restored position;
        # a loader that had already been iterated would count those twice.
        self.loader.num_samples_yielded = 0
        self._it = None


def build_data(cfg: Config, prompts: PromptBuilder, rank: int = 0,
               world_size: int = 1) -> tuple[CoTrainingLoader, dict[str, dict[str, Any]]]:
    """The loader for this rank and the action statistics per robot source."""
    dirs = source_dirs(cfg, rank)
    stats = source_stats(cfg, dirs, rank)
    return CoTrainingLoader(cfg, prompts, stats, dirs, rank, world_size), stats
