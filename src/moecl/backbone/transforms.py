"""Image preprocessing with Pillow + numpy (no torchvision): CLIP's eval transform and the protocol's train crop.

eval:  bicubic resize of the short side to `size`, center crop `size`x`size`, normalise.
train: RandomResizedCrop(size, scale=(0.9, 1.0), bicubic) as in the MTIL protocol, then normalise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """Same sampling rule as torchvision's RandomResizedCrop.get_params (10 tries, then center fallback)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


@dataclass(frozen=True)
class ImageTransform:
    """Picklable PIL -> tensor transform (DataLoader workers need to pickle it)."""

    size: int
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    train: bool = False
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Some backbones (EfficientNet-Lite, TF-style) expect (pixel - 127) / 128 instead of mean/std on [0, 1].
    tf_style: bool = False

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.normalize(self.geometry(img, rng))

    def geometry(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """The crop / resize part: uint8 (3, size, size). DataLoader workers send this (a quarter of the bytes of
        float pixels) and the main process normalises on the learner's device."""
        img = img.convert("RGB")
        if self.train:
            box = random_resized_crop_box(*img.size, self.scale, self.ratio, rng or random)
            img = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        else:
            img = center_crop(resize_short_side(img, self.size), self.size)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> the model's input in `dtype`, on the device of `pixels` (same arithmetic, in the
        same order, as computing it in numpy float32: bit-identical on the CPU, tested)."""
        x = pixels.to(dtype)
        if self.tf_style:
            return (x - 127.0) / 128.0
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(3, 1, 1)
        return (x / 255.0 - mean) / std

    def cache_key(self) -> str:
        """Identifies the deterministic (eval) preprocessing, for frozen-feature caches."""
        return f"{self.size}:{'tf' if self.tf_style else tuple(self.mean)}:{self.train}"


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float], tf_style: bool = False) -> torch.Tensor:
    """numpy float32 normalisation of a PIL image (what ImageTransform.normalize reproduces in torch)."""
    arr = np.asarray(img, dtype=np.float32)
    if tf_style:
        arr = (arr - 127.0) / 128.0
    else:
        arr = (arr / 255.0 - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
