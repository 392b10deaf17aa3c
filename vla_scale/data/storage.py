"""Where shard folders live: a local folder, or a URL that mosaicml-streaming can read and write
(s3://, gs://, oci://, hf://, azure://, azure-dl://, dbfs:/, sftp:// (read), ...).

Everything that touches object storage goes through streaming's own machinery
(`CloudDownloader` to read, `CloudUploader` to write), so every store
streaming supports works here with the same credentials and variables it
documents (for S3: the AWS_* variables, and S3_ENDPOINT_URL for an
S3-compatible server).

- `ShardFolder`: the files of one shard folder for whole-folder readers
  (`vla-scale stats`): its index, each shard's bytes checked against the
  index's hashes and size, small files read and written beside the shards.
- `resolve_source`: a training source path -> `ShardLocation`, the
  (remote, local cache folder) pair a `streaming.Stream` reads. The cache
  folder of a remote is named after the remote URL and the content of its
  index.json, so a dataset re-converted to the same URL never mixes with
  shards cached from its previous version, and two runs reading the same
  version share one node-local cache.

This module never modifies a local shard folder except to write a file the
caller asked for (stats.json), and never writes to a remote outside the
folder it was given.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import secrets
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vla_scale.data.streaming_compat import import_streaming
from vla_scale.errors import DataError

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
DEFAULT_TIMEOUT_S = 300.0


def _schemes() -> set[str]:
    import_streaming()
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS

    return {s for s in DOWNLOADER_MAPPINGS if s not in ("file",)} | {"dbfs"}


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL with a scheme (s3://, gs://, hf://...); False for a local path (and file://)."""
    scheme = urllib.parse.urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive, not a scheme


def check_remote(url: str) -> str:
    """The URL without a trailing slash, or DataError when streaming has no client for its scheme."""
    scheme = urllib.parse.urlparse(url).scheme
    schemes = _schemes()
    if scheme not in schemes:
        raise DataError(f"{url}: mosaicml-streaming cannot read '{scheme}://' URLs; supported: "
                        f"{sorted(s + '://' for s in schemes)}")
    return url.rstrip("/")


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _not_found(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError):
        return True
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound") or "not found" in str(e).lower()


def download(url: str, local: str | Path, timeout: float = DEFAULT_TIMEOUT_S, *, missing_ok: bool = False) -> bool:
    """Copy one remote file to `local` (written under a temporary name, then renamed).

    Returns False when the object does not exist and `missing_ok`; any other failure is a DataError
    naming the URL and the cause (credentials, endpoint, network).
    """
    import_streaming()
    from streaming.base.storage.download import CloudDownloader

    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{secrets.token_hex(4)}")
    try:
        CloudDownloader.direct_download(url, str(tmp), timeout)
        os.replace(tmp, local)
        return True
    except Exception as e:  # boto3/gcs/oci... each raise their own types
        if _not_found(e):
            if missing_ok:
                return False
            raise DataError(f"{url} does not exist (check the path and the bucket's permissions)") from None
        raise DataError(f"cannot download {url}: {type(e).__name__}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def upload(local_dir: str | Path, remote_dir: str, names: list[str]) -> None:
    """Upload files of `local_dir` to `remote_dir` in the given order (the local files are kept)."""
    import_streaming()
    from streaming.base.storage.upload import CloudUploader

    quiet = logging.getLogger("streaming.base.storage.upload")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that local_dir is not empty: here it holds what we upload
    try:
        uploader = CloudUploader.get((str(local_dir), remote_dir), keep_local=True, exist_ok=True)
        for name in names:
            uploader.upload_file(name)
    except Exception as e:
        raise DataError(f"cannot upload to {remote_dir}: {type(e).__name__}: {e}") from None
    finally:
        quiet.setLevel(level)


def remote_exists(url: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    with tempfile.TemporaryDirectory(prefix="vla-scale-probe-") as d:
        return download(url, Path(d) / "probe", timeout, missing_ok=True)


# --------------------------------------------------------------------------------------------
# index and hashes
# --------------------------------------------------------------------------------------------
def parse_index(text: bytes | str, where: str) -> list[dict[str, Any]]:
    try:
        shards = json.loads(text)["shards"]
        if not isinstance(shards, list):
            raise TypeError("'shards' is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: not a valid MDS index ({e})") from None
    return shards


def index_hashes(shards: list[dict[str, Any]]) -> list[str]:
    """The hash algorithms every shard of an index carries (empty for shards written without hashes)."""
    common: set[str] | None = None
    for s in shards:
        algos = set((s.get("raw_data") or {}).get("hashes") or {})
        common = algos if common is None else common & algos
    return sorted(common or ())


def file_hash(algo: str, data: bytes | memoryview | mmap.mmap) -> str:
    import_streaming()
    from streaming.base.hashing import get_hash

    return get_hash(algo, data)  # type: ignore[arg-type]


def check_shard_bytes(data: Any, info: dict[str, Any], where: str, algo: str | None) -> None:
    """DataError naming `where` when `data` is not the file the index describes (size, then hash)."""
    want = info.get("bytes")
    if want is not None and len(data) != int(want):
        kind = "truncated" if len(data) < int(want) else "longer than written"
        raise DataError(f"{where}: the shard file is {kind}: {len(data)} bytes, index.json says {want}; "
                        f"re-convert or re-upload the dataset")
    hashes = info.get("hashes") or {}
    if algo and algo in hashes:
        got = file_hash(algo, data)
        if got != hashes[algo]:
            raise DataError(f"{where}: the shard file is corrupt: its {algo} hash is {got}, index.json says "
                            f"{hashes[algo]}; re-convert or re-upload the dataset")


def fastest_hash(available: list[str]) -> str | None:
    for algo in ("xxh3_64", "xxh64", "xxh128", "xxh3_128", "xxh32", "sha1", "md5", "sha256"):
        if algo in available:
            return algo
    return available[0] if available else None


# --------------------------------------------------------------------------------------------
# whole-folder readers
# --------------------------------------------------------------------------------------------
class ShardFolder:
    """A shard folder, local or remote: its index, each shard's verified bytes, small files beside it."""

    def __init__(self, path: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.remote = check_remote(str(path)) if is_remote(path) else None
        self.path = self.remote or str(Path(path))
        self.name = self.path.rstrip("/").rsplit("/", 1)[-1]
        self.timeout = timeout
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __str__(self) -> str:
        return self.path

    def _scratch(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vla-scale-shards-")
        return Path(self._tmp.name)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def read_file(self, name: str, *, missing_ok: bool = False) -> bytes | None:
        if self.remote is None:
            try:
                return (Path(self.path) / name).read_bytes()
            except FileNotFoundError:
                if missing_ok:
                    return None
                raise DataError(f"{Path(self.path) / name} is missing") from None
        local = self._scratch() / f"{secrets.token_hex(4)}-{name}"
        if not download(join(self.remote, name), local, self.timeout, missing_ok=missing_ok):
            return None
        try:
            return local.read_bytes()
        finally:
            local.unlink(missing_ok=True)

    def write_file(self, name: str, data: bytes) -> str:
        """Write NAME beside the shards atomically (local: temporary file + rename; remote: one upload)."""
        if self.remote is None:
            path = Path(self.path) / name
            tmp = path.with_name(f".{name}.tmp-{secrets.token_hex(4)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return str(path)
        d = self._scratch() / f"up-{secrets.token_hex(4)}"
        d.mkdir()
        (d / name).write_bytes(data)
        upload(d, self.remote, [name])
        shutil.rmtree(d, ignore_errors=True)
        return join(self.remote, name)

    def index(self) -> list[dict[str, Any]]:
        where = join(self.path, INDEX_FILE)
        data = self.read_file(INDEX_FILE, missing_ok=True)
        if data is None:
            raise DataError(f"{where} is missing: {self.path} is not a shard folder (write one with "
                            f"`vla-scale convert`)")
        return parse_index(data, where)

    @contextlib.contextmanager
    def shard_bytes(self, shard: dict[str, Any]) -> Iterator[Any]:
        """The uncompressed shard as a sliceable buffer, after checking it against the index (size and
        hash when the index has one). Local raw files are memory-mapped; remote ones are downloaded to a
        scratch folder and deleted afterwards (one shard on disk at a time)."""
        raw = shard["raw_data"]
        zipped = shard.get("zip_data")
        algo = fastest_hash(sorted((raw.get("hashes") or {})))
        if self.remote is None:
            folder = Path(self.path)
            path = folder / raw["basename"]
            if path.is_file():
                with open(path, "rb") as f:
                    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
                try:
                    check_shard_bytes(buf, raw, str(path), algo)
                    yield buf
                finally:
                    if isinstance(buf, mmap.mmap):
                        buf.close()
                return
            if zipped and (folder / zipped["basename"]).is_file():
                yield self._decompress((folder / zipped["basename"]).read_bytes(), shard, str(folder))
                return
            raise DataError(f"{folder}: shard file {raw['basename']} is missing")
        local = self._scratch() / (zipped or raw)["basename"]
        try:
            download(join(self.remote, (zipped or raw)["basename"]), local, self.timeout)
            data = local.read_bytes()
        finally:
            local.unlink(missing_ok=True)
        if zipped:
            yield self._decompress(data, shard, self.remote)
        else:
            check_shard_bytes(data, raw, join(self.remote, raw["basename"]), algo)
            yield data

    @staticmethod
    def _decompress(data: bytes, shard: dict[str, Any], folder: str) -> bytes:
        from streaming.base.compression import decompress

        zipped = shard["zip_data"]
        check_shard_bytes(data, zipped, join(folder, zipped["basename"]),
                          fastest_hash(sorted(zipped.get("hashes") or {})))
        raw = decompress(shard["compression"], data)
        check_shard_bytes(raw, shard["raw_data"], join(folder, shard["raw_data"]["basename"]),
                          fastest_hash(sorted(shard["raw_data"].get("hashes") or {})))
        return raw


# --------------------------------------------------------------------------------------------
# training sources
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLocation:
    """Where a streaming `Stream` reads one source: `local` (the folder itself, or the node-local cache of
    `remote`) and the hash algorithms its index carries."""

    path: str
    local: Path
    remote: str | None = None
    hashes: tuple[str, ...] = ()

    def stream(self, *, proportion: float | None, validate_hash: str | None, download_timeout: float,
               download_retry: int) -> Any:
        streaming = import_streaming()
        # Ask streaming to check only hashes the index has: it raises on shards written without one.
        algo = validate_hash if validate_hash in self.hashes else None
        return streaming.Stream(remote=self.remote, local=str(self.local), proportion=proportion,
                                validate_hash=algo, download_timeout=download_timeout,
                                download_retry=download_retry)


def cache_root(cache_dir: str | None) -> Path:
    """The node-local folder remote shards are cached in (data.storage.cache_dir, default under TMPDIR)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(tempfile.gettempdir()) / "vla-scale-shard-cache"


def resolve_source(path: str, *, name: str, cache_dir: str | None, timeout: float = DEFAULT_TIMEOUT_S,
                   what: str = "source") -> ShardLocation:
    """A source path -> ShardLocation; DataError naming `what` when it is not a shard folder.

    For a remote, every rank downloads index.json itself (one small GET; no rank waits on another), and
    the cache folder is named after the URL and that index's content (see the module docstring).
    """
    if not is_remote(path):
        folder = Path(path)
        index = folder / INDEX_FILE
        if not index.is_file():
            raise DataError(f"{what}={path!r} is not a shard folder (no index.json); write one with "
                            f"`vla-scale convert`")
        return ShardLocation(path=path, local=folder, hashes=tuple(index_hashes(parse_index(index.read_bytes(),
                                                                                            str(index)))))
    remote = check_remote(path)
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".index-{secrets.token_hex(6)}.json"
    try:
        if not download(join(remote, INDEX_FILE), probe, timeout, missing_ok=True):
            raise DataError(f"{what}={path!r}: {join(remote, INDEX_FILE)} does not exist: not a shard folder "
                            f"(write one with `vla-scale convert ... --out {remote}`)")
        data = probe.read_bytes()
        shards = parse_index(data, join(remote, INDEX_FILE))
        key = f"{hashlib.sha1(remote.encode()).hexdigest()[:10]}-{hashlib.sha1(data).hexdigest()[:10]}"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        local = root / f"{safe}-{key}"
        local.mkdir(parents=True, exist_ok=True)
        if not (local / INDEX_FILE).is_file():
            os.replace(probe, local / INDEX_FILE)  # identical bytes from every rank: any one may win
    finally:
        probe.unlink(missing_ok=True)
    return ShardLocation(path=path, local=local, remote=remote, hashes=tuple(index_hashes(shards)))
