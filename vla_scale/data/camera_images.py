"""How camera images are stored in shards: one column per camera, one codec for all of them.

Column convention: the primary camera is the column `image`, every other
camera `image_<name>` (`camera_column("wrist") == "image_wrist"`). Every
camera column is an MDS `bytes` column holding one encoded image (JPEG or
PNG; the bytes say which), or b"" for "no image". Shards written before
this convention stored `image` with streaming's `jpeg` encoding (read back
as a PIL image) and the wrist camera as `wrist_image` bytes:
`decode_camera_image` reads all of these, so old shards keep working.

Why bytes and not streaming's `jpeg`/`png` encodings: streaming's `jpeg`
re-encodes at quality 75, and it cannot keep a source's own JPEG bytes.
Here a frame is compressed at most once on its way from the source to the
model:

- an already-JPEG source frame (LLaVA images, JPEG-in-parquet) is stored
  byte for byte: decoding it gives exactly the source's pixels, and any
  re-encoding could only lose detail (JPEG) or inflate it (PNG);
- a PNG source frame is kept as is with the `png` codec and encoded once
  at the configured quality with `jpeg`;
- decoded frames (video, HDF5, simulators) are encoded once with the codec.

`ImageCodec` is the one setting (default JPEG quality 95); `ShardWriter`
applies it to every camera column. This module never reads or writes files.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vla_scale.errors import DataError

PRIMARY_CAMERA = "primary"
IMAGE_COLUMN = "image"
LEGACY_WRIST_COLUMN = "wrist_image"  # the wrist camera's column before the image_<name> convention
FORMATS = ("jpeg", "png")
DEFAULT_QUALITY = 95
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


def camera_column(camera: str) -> str:
    """The shard column of a camera: "image" for the primary camera, "image_<name>" for the others."""
    if camera == PRIMARY_CAMERA:
        return IMAGE_COLUMN
    if not camera or not camera.replace("_", "a").isalnum() or not camera.isascii():
        raise DataError(f"camera name {camera!r}: use letters, digits and '_' (it becomes the column "
                        f"'image_{camera}')")
    return f"{IMAGE_COLUMN}_{camera}"


def camera_of_column(column: str) -> str | None:
    """The camera a column holds (inverse of `camera_column`; the legacy wrist column is "wrist"); else None."""
    if column == IMAGE_COLUMN:
        return PRIMARY_CAMERA
    if column == LEGACY_WRIST_COLUMN:
        return "wrist"
    if column.startswith(IMAGE_COLUMN + "_"):
        return column[len(IMAGE_COLUMN) + 1:]
    return None


def is_camera_column(column: str) -> bool:
    return camera_of_column(column) is not None


def image_format(data: bytes) -> str | None:
    """'jpeg' or 'png' from the first bytes, else None (other formats are re-encoded when stored)."""
    for magic, name in _MAGIC.items():
        if data[:len(magic)] == magic:
            return name
    return None


def rgb_image(image: Any, where: str) -> Image.Image:
    """A PIL image or an RGB uint8 (H, W, 3) array as an RGB PIL image; DataError for anything else."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"{where}: expected an RGB uint8 image (H, W, 3), got {arr.dtype} {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


@dataclass(frozen=True)
class ImageCodec:
    """How camera images are stored: `format` "jpeg" (at `quality`) or "png" (lossless)."""

    format: str = "jpeg"
    quality: int = DEFAULT_QUALITY

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"image format {self.format!r} is not one of {list(FORMATS)}")
        if not 1 <= int(self.quality) <= 100:
            raise DataError(f"JPEG quality must be in 1..100, got {self.quality}")

    def encode(self, image: Any, where: str = "image") -> bytes:
        """Pixels (PIL image or RGB uint8 array) -> encoded bytes in this codec's format."""
        buf = io.BytesIO()
        if self.format == "jpeg":
            # 4:4:4 chroma at high quality: PIL's default 4:2:0 halves colour resolution whatever the quality.
            rgb_image(image, where).save(buf, format="JPEG", quality=int(self.quality),
                                         subsampling=0 if self.quality >= 90 else 2)
        else:
            rgb_image(image, where).save(buf, format="PNG", compress_level=6)
        return buf.getvalue()

    def store(self, image: Any, where: str = "image") -> bytes:
        """What a camera column holds for `image`: encoded bytes are kept when that loses nothing
        (any JPEG; PNG under the png codec), everything else is encoded once. None or b"" -> b""."""
        if image is None:
            return b""
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            if not data:
                return b""
            kind = image_format(data)
            if kind == "jpeg" or kind == self.format:
                return data
            return self.encode(decode_camera_image(data, where), where)
        return self.encode(image, where)

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, **({"quality": int(self.quality)} if self.format == "jpeg" else {})}


DEFAULT_CODEC = ImageCodec()


def decode_camera_image(value: Any, where: str = "image") -> Image.Image | None:
    """A camera column's value as an RGB PIL image; None for "no image" (b"").

    Reads every layout shards have used: encoded bytes (this module's), a PIL
    image (the `jpeg` column of older shards) and the legacy wrist bytes.
    """
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            return None
        try:
            with Image.open(io.BytesIO(bytes(value))) as img:
                return img.convert("RGB")  # convert() forces the full decode: truncated data fails here
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{where}: cannot decode the stored image: {e}") from None
    raise DataError(f"{where}: a camera column holds {type(value).__name__}; expected encoded image bytes")
