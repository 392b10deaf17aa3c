"""Atomic MDS shard writing with the shard schema's columns, to a local folder or object storage.

`ShardWriter` wraps mosaicml-streaming's `MDSWriter`: samples are written
into a sibling folder `OUT.tmp-<random>` and that folder is renamed to OUT
only after the index is complete, so a crash, an exception or Ctrl-C never
leaves an OUT that looks complete. An existing non-empty OUT is refused
unless `overwrite=True`, in which case the old folder is swapped out only
once the new one is finished. It also keeps the conversion summary
(samples, episodes, skipped samples/episodes with reasons, bytes).

OUT may be a URL streaming can write (s3://, gs://, oci://, hf://, azure://...).
Then shards are staged in a local temporary folder and uploaded by
streaming's own uploader as each one is finished (one upload thread, in
order, each local copy deleted once uploaded: local disk holds about two
shards, never the dataset), and index.json is uploaded last, after every
shard: a remote folder without index.json is not a dataset to any reader,
so an interrupted upload never looks complete. A remote OUT that already
holds an index.json is refused unless `overwrite=True`.

Every shard is written with hashes (`HASHES`: sha1 for standard tools,
xxh64 for fast checks on every read) in index.json; camera columns are
encoded by one `ImageCodec` (see `vla_scale.data.camera_images`). Cameras
other than the primary and the wrist (`image_<name>` columns) are declared
up front (`cameras=["left", ...]`): MDS fixes a folder's columns when it is
created. A row without a declared camera stores it as absent (b"").

It never reads a source dataset and never decides what is a bad sample:
converters validate, and tell the writer what they skipped.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from vla_scale.data import storage
from vla_scale.data.camera_images import (DEFAULT_CODEC, LEGACY_WRIST_COLUMN, PRIMARY_CAMERA, ImageCodec, camera_column,
                                          is_camera_column)
from vla_scale.data.schema import COLUMNS
from vla_scale.data.streaming_compat import import_streaming
from vla_scale.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_SIZE_LIMIT = "64mb"
HASHES = ("sha1", "xxh64")  # sorted, as MDSWriter requires
SUMMARY_FILE = "conversion.json"
_MAX_SKIP_EXAMPLES = 20  # enough to diagnose a pattern, bounded for datasets with millions of bad rows


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output(out: str | Path, overwrite: bool) -> Path | str:
    """OUT as a Path (or a URL), after refusing a non-empty OUT (unless overwrite) or a file at OUT."""
    if storage.is_remote(out):
        url = storage.check_remote(str(out))
        if not overwrite and storage.remote_exists(storage.join(url, storage.INDEX_FILE)):
            raise DataError(f"{url} already holds a shard folder (index.json); pass --overwrite (overwrite=True) "
                            f"to replace it, or choose another output path")
        return url
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder; choose another output path")
    if out.is_dir() and not _is_empty_dir(out) and not overwrite:
        raise DataError(f"output folder {out} exists and is not empty; pass --overwrite (overwrite=True) "
                        f"to replace it, or choose another output path")
    return out


class ShardWriter:
    """Writes schema rows to MDS shards in a temporary folder; `close()` renames it into place.

    Use as a context manager: leaving the block normally commits, leaving it by
    any exception (KeyboardInterrupt included) removes the temporary folder and
    re-raises. `summary` is the dict converters return.
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False, size_limit: int | str | None = DEFAULT_SIZE_LIMIT,
                 compression: str | None = None, metadata: dict[str, Any] | None = None,
                 codec: ImageCodec | None = None, cameras: Sequence[str] = ()) -> None:
        # Declared first, so that a bad camera name is refused before anything is created.
        extra = {camera_column(c): "bytes" for c in cameras if c not in (PRIMARY_CAMERA, "wrist")}
        self.columns: dict[str, str] = {**COLUMNS, **extra}
        self.extra_cameras = tuple(extra)
        checked = check_output(out, overwrite)
        self.remote: str | None = checked if isinstance(checked, str) else None
        self.overwrite = overwrite
        self.codec = codec or DEFAULT_CODEC
        self.metadata = dict(metadata or {})
        if self.remote is None:
            assert isinstance(checked, Path)
            self.out: Path | str = checked.absolute()
            self.out.parent.mkdir(parents=True, exist_ok=True)
            stale = sorted(p.name for p in self.out.parent.glob(f"{self.out.name}.tmp-*"))
            if stale:  # left by a killed conversion (SIGKILL skips our cleanup); never removed: one may be running
                log.warning("found %s beside %s: left by an interrupted conversion; delete them once no conversion "
                            "into %s is running", ", ".join(stale), self.out, self.out.name)
            self.tmp = self.out.with_name(f"{self.out.name}.tmp-{secrets.token_hex(4)}")
            target: Any = str(self.tmp)
        else:
            self.out = self.remote
            self.tmp = Path(tempfile.mkdtemp(prefix="vla-scale-upload-"))
            self.tmp.rmdir()  # MDSWriter creates it, and refuses a folder that exists with contents
            target = (str(self.tmp), self.remote)
        streaming = import_streaming()
        self._upload_error: BaseException | None = None
        try:
            # max_workers=1: uploads run in order, so index.json (submitted last) lands after every shard.
            self._mds = streaming.MDSWriter(out=target, columns=self.columns, compression=compression,
                                            size_limit=size_limit, max_workers=1, hashes=list(HASHES),
                                            keep_local=self.remote is None)
        except Exception as e:  # invalid compression name or size limit; an unreachable bucket
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise DataError(f"cannot write shards to {self.out}: {type(e).__name__}: {e}") from None
        self._wrap_uploads()
        self._started = time.monotonic()
        self._closed = False
        self.samples = 0
        self.episodes = 0
        self.skipped_samples = 0
        self.skipped_episodes = 0
        self.skip_reasons: Counter[str] = Counter()
        self.skip_examples: list[str] = []
        self._last_episode: tuple[str, int] | None = None
        self.bytes = 0
        self.shards = 0
        self._final: dict[str, Any] | None = None

    def _wrap_uploads(self) -> None:
        """Keep the first upload failure: streaming's threads only log it and set a flag."""
        uploader = self._mds.cloud_writer
        upload_file = uploader.upload_file

        def recording(name: str) -> None:
            try:
                upload_file(name)
            except BaseException as e:
                self._upload_error = self._upload_error or e
                raise

        uploader.upload_file = recording

    def _upload_failed(self) -> DataError:
        e = self._upload_error
        return DataError(f"uploading shards to {self.out} failed: {type(e).__name__}: {e}" if e is not None else
                         f"uploading shards to {self.out} failed (see the log above)")

    # -- writing ---------------------------------------------------------------------------
    def write(self, sample: dict[str, Any], where: str = "sample") -> None:
        """Write one row built by `schema.robot_sample` / `schema.vl_sample`."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        sample = {**{c: None for c in self.extra_cameras if c not in sample}, **sample}  # absent cameras: b""
        if set(sample) != set(self.columns):
            missing, extra = sorted(set(self.columns) - set(sample)), sorted(set(sample) - set(self.columns))
            hint = ""
            if any(is_camera_column(c) and c != LEGACY_WRIST_COLUMN for c in extra):
                names = [c[len("image_"):] for c in extra if c.startswith("image_")]
                hint = f"; declare the cameras when creating the writer: ShardWriter(..., cameras={names})"
            raise DataError(f"{where}: sample columns do not match the shard schema (missing {missing}, extra "
                            f"{extra}){hint}")
        row = {k: self.codec.store(v, f"{where} ({k})") if is_camera_column(k) else v for k, v in sample.items()}
        try:
            self._mds.write(row)
        except (ValueError, TypeError, KeyError) as e:  # an encoding rejected a value: a bug in the row, not the disk
            raise DataError(f"{where}: cannot encode the sample: {e}") from None
        except Exception:  # streaming's "One of the threads failed": an upload
            if self._mds.event.is_set():
                raise self._upload_failed() from None
            raise
        self.samples += 1
        if sample["episode"] >= 0:
            key = (sample["dataset"], int(sample["episode"]))
            if key != self._last_episode:  # converters write episodes contiguously; no set of all ids is kept
                self.episodes += 1
                self._last_episode = key

    def skip(self, reason: str, message: str, *, samples: int = 0, episodes: int = 0) -> None:
        """Record a skipped episode or sample (--skip-bad): `reason` is a short kind, `message` the full error."""
        self.skipped_samples += samples
        self.skipped_episodes += episodes
        self.skip_reasons[reason] += 1
        if len(self.skip_examples) < _MAX_SKIP_EXAMPLES:
            self.skip_examples.append(message)
        log.warning("skipped: %s", message)

    @property
    def summary(self) -> dict[str, Any]:
        """Counts so far; after `close()`, the final summary (also saved as OUT/conversion.json)."""
        if self._final is not None:
            return dict(self._final)
        return {
            "out": str(self.out),
            "samples": self.samples,
            "episodes": self.episodes,
            "skipped": {"samples": self.skipped_samples, "episodes": self.skipped_episodes,
                        "reasons": dict(self.skip_reasons), "examples": list(self.skip_examples)},
            "shards": self.shards,
            "bytes": self.bytes,
            "hashes": list(HASHES),
            "image_codec": self.codec.describe(),
            "seconds": round(time.monotonic() - self._started, 3),
            **self.metadata,
        }

    # -- finishing -------------------------------------------------------------------------
    def close(self) -> dict[str, Any]:
        """Finish the index and move the folder into place. Returns the summary."""
        if self._closed:
            return self.summary
        try:
            if self.samples == 0:
                raise DataError(f"nothing to write to {self.out}: every sample was skipped or the source is empty "
                                f"(skipped: {dict(self.skip_reasons) or 'none'})")
            try:
                self._mds.finish()
            except Exception:
                if self._mds.event.is_set():
                    raise self._upload_failed() from None
                raise
            self.shards = len(self._mds.shards)
            self.bytes = sum(int(((s.get("zip_data") or s["raw_data"]) or {}).get("bytes", 0))
                             for s in self._mds.shards)
            summary = self.summary
            if self.remote is None:
                (self.tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
                self._move_into_place()
            else:  # after index.json: a report, not part of the dataset
                self.tmp.mkdir(parents=True, exist_ok=True)
                (self.tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
                storage.upload(self.tmp, self.remote, [SUMMARY_FILE])
                shutil.rmtree(self.tmp, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._final = summary
        return dict(summary)

    def _move_into_place(self) -> None:
        check_output(self.out, self.overwrite)  # it may have appeared while we were converting
        old = None
        if self.out.is_dir():
            if _is_empty_dir(self.out):
                self.out.rmdir()
            else:  # overwrite: swap, so there is never a half-written OUT
                old = self.out.with_name(f"{self.out.name}.old-{secrets.token_hex(4)}")
                os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written so far; OUT is left as it was."""
        if self._closed:
            return
        self._closed = True
        try:
            self._mds.cancel_future_jobs()
        except Exception:  # the pool may already be shut down; the folder removal below is what matters
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
