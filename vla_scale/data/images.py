"""Images in, pixel tensors out: the one place that turns uint8 HxWx3 into model input.

Training and the policy both call `to_pixels`, so an image is resized
identically in both. Pixels stay uint8 (3, H, W) through loading and
collation - a quarter of the bytes of float32 in host memory and on the way
to the GPU - and become floats on the device: scaling to [0, 1] and
per-encoder normalisation happen inside each encoder (`VisionEncoder`),
never here.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vla_scale.errors import DataError


def rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """The image as a uint8 (H, W, 3) array; DataError for anything else."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise DataError(f"expected a uint8 image, got {image.dtype}")
    return image


def to_pixels(image: np.ndarray | Image.Image, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, size, size), bilinear resize. A PIL image is resized as it is (no
    round trip through an array: the same pixels, two copies fewer per camera image)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        array = np.asarray(image)
    else:
        array = rgb_array(image)
        if array.shape[0] != size or array.shape[1] != size:
            array = np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
