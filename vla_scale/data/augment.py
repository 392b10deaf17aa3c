"""OpenVLA-style image augmentation, deterministic per (seed, sample, epoch).

    random resized crop (area scale 0.9, square aspect) -> resize back
    colour jitter: brightness +-0.2, contrast [0.8, 1.2], saturation [0.8, 1.2], hue +-0.05

(OpenVLA's `image_aug` for RLDS data uses these values.) Only robot frames
are augmented: vision-language answers may hold image coordinates, which a
crop would make wrong. At inference the policy applies `center_crop`, the
crop that the random one averages to (OpenVLA's `center_crop`), when the
model was trained with augmentation; the export records which.
It runs once per
sample, before pixels are made, so every encoder - frozen or trained - sees
the same augmented image. It takes its randomness only from the generator
it is given, never from global RNG state, so data order and augmentation
are reproducible under resume and across worker counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: float = 0.9
    brightness: float = 0.2
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.05


_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by `shift` turns (+-0.05 = +-18 degrees) as a rotation of the IQ chroma plane.

    A 3x3 colour matrix applied by PIL in C: 0.1 ms at 224 px against 1.8 ms for an HSV
    round trip. It keeps luma exactly and differs from an HSV hue shift only in how
    saturated colours clip, which does not matter for augmentation.
    """
    if abs(shift) < 1e-6:
        return img
    c, s = np.cos(2 * np.pi * shift), np.sin(2 * np.pi * shift)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
    m = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
    return img.convert("RGB", tuple(float(v) for row in m for v in (*row, 0.0)))


def crop_box(w: int, h: int, scale: float, rng: np.random.Generator | None = None) -> tuple[float, ...]:
    """(left, top, right, bottom) of a square-aspect crop of `scale` of the area: random, or centred without rng.

    The centred box is the mean of the random ones (offsets are uniform), so it
    may sit on half pixels; PIL's resize samples such a box exactly.
    """
    side = scale ** 0.5
    cw, ch = max(1, round(w * side)), max(1, round(h * side))
    if rng is None:
        x0, y0 = (w - cw) / 2, (h - ch) / 2
    else:
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return (x0, y0, x0 + cw, y0 + ch)


def center_crop(image: Image.Image, scale: float) -> Image.Image:
    """The inference-time counterpart of the random crop: the centred box, resized back to the image's size."""
    return image.resize(image.size, Image.BILINEAR, box=crop_box(*image.size, scale))


def inference_preprocessing(augment: bool, cfg: AugmentConfig = AugmentConfig()) -> dict:
    """What an export records about images: the centre crop training's random crop calls for, or none."""
    return {"center_crop_scale": cfg.crop_scale if augment else None}


def augment_image(image: Image.Image, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> Image.Image:
    w, h = image.size
    img = image.crop(crop_box(w, h, cfg.crop_scale, rng)).resize((w, h), Image.BILINEAR)
    # Jitter in a random order, as torchvision's ColorJitter does.
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))),
        lambda im: ImageEnhance.Contrast(im).enhance(float(rng.uniform(*cfg.contrast))),
        lambda im: ImageEnhance.Color(im).enhance(float(rng.uniform(*cfg.saturation))),
        lambda im: _shift_hue(im, float(rng.uniform(-cfg.hue, cfg.hue))),
    ]
    for k in rng.permutation(len(ops)):
        img = ops[int(k)](img)
    return img
