"""What every robot converter shares: the episode in memory, its validation, and the write loop.

A converter reads a source episode by episode into a `RobotEpisode` (images
kept as encoded bytes, so one episode costs about T x (compressed frame
size) of memory, never T x H x W x 3), `write_robot_episodes` validates the
whole episode and only then writes it. That order is what makes --skip-bad
skip whole episodes cleanly: a bad episode is found before any of its steps
reach the shards.

--skip-bad granularity for robot data is the EPISODE: an episode with one NaN
action, one missing image or mismatched lengths is dropped entirely (a hole
inside an episode would corrupt action chunks and step indices built across
it). The summary counts skipped episodes, their steps, and the reasons.
Problems with the dataset as a whole (an unreadable or corrupt file, a
missing column, metadata that cannot be parsed, images that are not RGB)
stop the conversion even with --skip-bad: skipping would silently drop
everything.

This module never opens a source file itself and never writes outside the
`ShardWriter` it is given.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from vla_scale.data.camera_images import DEFAULT_CODEC, ImageCodec
from vla_scale.data.schema import robot_sample
from vla_scale.data.writer import ShardWriter
from vla_scale.errors import DataError

ProgressCallback = Callable[[dict[str, Any]], None]


class BadSampleError(DataError):
    """One episode or sample is malformed; `reason` is a short kind for the --skip-bad summary."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded bytes (PNG, JPEG, ...) -> a fully decoded RGB image, or BadSampleError naming `where`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")  # convert() forces the full decode, so truncated data fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSampleError("undecodable image", f"{where}: cannot decode the image: {e}") from None


def encode_frame(frame: np.ndarray, where: str, codec: ImageCodec = DEFAULT_CODEC) -> bytes:
    """A decoded RGB frame (video, HDF5) -> bytes in the shards' own codec, for the in-memory episode.

    These bytes are what the shard stores (the writer keeps them as they are), so a frame is
    compressed once. With the default JPEG 95 a 1000-step 480x640 episode stays near 60 MB; with
    the png codec it takes about ten times that.
    """
    return codec.encode(np.ascontiguousarray(frame), where)


@dataclass
class RobotEpisode:
    """One source episode in memory, ready to validate and write.

    `where` names it for messages, e.g. "/data/libero.hdf5: demo_7" or
    "/data/ds/data/chunk-000/file-000.parquet: episode 3".
    """

    where: str
    episode: int
    actions: np.ndarray  # (T, D)
    images: Sequence[bytes | None]  # primary camera, encoded, one per step
    instructions: Sequence[str]  # one per step (LeRobot tasks may change within an episode)
    states: np.ndarray | None = None  # (T, S)
    wrist_images: Sequence[bytes | None] | None = None
    # Other cameras by name (data.cameras), encoded, one per step; "wrist" may come here or in wrist_images.
    cameras: dict[str, Sequence[bytes | None]] | None = None
    # True when the converter encoded the images itself (video, HDF5): no need to decode them to validate.
    images_verified: bool = False


@dataclass
class PendingEpisode:
    """An episode not read yet: `load()` may raise BadSampleError, which --skip-bad turns into a skip."""

    where: str
    length: int | None  # steps, when the source says so up front (for the skipped-steps count)
    load: Callable[[], RobotEpisode]


def _first_bad(mask: np.ndarray) -> tuple[int, int]:
    t, k = np.argwhere(mask)[0]
    return int(t), int(k)


def validate_episode(ep: RobotEpisode, action_dim: int | None) -> None:
    """Raise BadSampleError naming file, episode and step for the first problem found."""
    a = ep.actions
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise BadSampleError("bad action shape", f"{ep.where}: actions must have shape (T, D) with T, D >= 1, "
                                                 f"got {a.shape}")
    steps, dim = a.shape
    if action_dim is not None and dim != action_dim:
        raise BadSampleError("length mismatch", f"{ep.where}: actions have {dim} dimensions, earlier episodes "
                                                f"had {action_dim}")
    bad = ~np.isfinite(a)
    if bad.any():
        t, k = _first_bad(bad)
        raise BadSampleError("non-finite action", f"{ep.where}, step {t}: action[{k}] is {a[t, k]} "
                                                  f"({int(bad.any(axis=1).sum())} of {steps} steps are non-finite)")
    extra = [(f"camera {k!r} images", v) for k, v in (ep.cameras or {}).items()]
    for name, seq in (("images", ep.images), ("instructions", ep.instructions), ("wrist images", ep.wrist_images),
                      *extra):
        if seq is not None and len(seq) != steps:
            raise BadSampleError("length mismatch", f"{ep.where}, step {min(len(seq), steps)}: {len(seq)} {name} "
                                                    f"for {steps} actions")
    if ep.states is not None:
        s = ep.states
        if s.ndim != 2 or s.shape[0] != steps:
            raise BadSampleError("length mismatch", f"{ep.where}, step {min(s.shape[0], steps)}: state has shape "
                                                    f"{s.shape} for {steps} actions")
        bad = ~np.isfinite(s)
        if bad.any():
            t, k = _first_bad(bad)
            raise BadSampleError("non-finite state", f"{ep.where}, step {t}: state[{k}] is {s[t, k]}")
    for name, seq in (("image", ep.images), ("wrist image", ep.wrist_images),
                      *[(f"camera {k!r} image", v) for k, v in (ep.cameras or {}).items()]):
        if seq is None:
            continue
        for t, data in enumerate(seq):
            if not data:
                raise BadSampleError("missing image", f"{ep.where}, step {t}: the {name} is missing")
            if not ep.images_verified:  # decode now, so a corrupt image is found before the episode is written
                decode_image(data, f"{ep.where}, step {t} ({name})")


def write_robot_episodes(writer: ShardWriter, pending: Iterable[PendingEpisode], *, dataset: str, skip_bad: bool,
                         total: int | None, progress: bool, callback: ProgressCallback | None = None) -> None:
    """Validate and write each episode in turn; with skip_bad, record bad ones in the writer's summary."""
    from tqdm.auto import tqdm

    action_dim: int | None = None
    with tqdm(total=total, unit="episode", desc=f"convert {dataset}", disable=not progress) as bar:
        for p in pending:
            try:
                ep = p.load()
                validate_episode(ep, action_dim)
            except BadSampleError as e:
                if not skip_bad:
                    raise
                writer.skip(e.reason, str(e), episodes=1, samples=p.length or 0)
                bar.update(1)
                continue
            action_dim = ep.actions.shape[1]
            for t in range(ep.actions.shape[0]):
                where = f"{ep.where}, step {t}"
                # Encoded bytes go to the writer as they are: it keeps JPEG (and PNG under the png codec)
                # byte for byte and encodes anything else once (vla_scale.data.camera_images).
                wrist = None if ep.wrist_images is None else ep.wrist_images[t]
                cams = {k: v[t] for k, v in (ep.cameras or {}).items()}
                writer.write(robot_sample(image=ep.images[t], wrist_image=wrist, cameras=cams,
                                          instruction=ep.instructions[t], action=ep.actions[t],
                                          state=None if ep.states is None else ep.states[t], dataset=dataset,
                                          episode=ep.episode, step=t, where=where), where=where)
            bar.update(1)
            if callback is not None:
                callback(writer.summary)


def dataset_name_for(src: str | Path, name: str | None) -> str:
    """The `dataset` column: the given name, else the source's folder or file name."""
    if name:
        return name
    p = Path(src).resolve()
    return p.stem if p.is_file() else p.name
