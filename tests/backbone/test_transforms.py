import random

import numpy as np
import torch
from PIL import Image

from moecl.backbone.transforms import CLIP_MEAN, ImageTransform, random_resized_crop_box


def test_eval_transform_shape_and_normalisation():
    img = Image.new("RGB", (320, 200), color=(255, 0, 128))
    out = ImageTransform(size=64)(img)
    assert out.shape == (3, 64, 64)
    expected_r = (1.0 - CLIP_MEAN[0]) / 0.26862954
    assert torch.allclose(out[0], torch.full((64, 64), expected_r), atol=1e-4)


def test_tf_style_scaling():
    img = Image.new("RGB", (10, 10), color=(255, 127, 0))
    out = ImageTransform(size=8, tf_style=True)(img)
    assert np.allclose(out[:, 0, 0].numpy(), [1.0, 0.0, -127 / 128])


def test_random_resized_crop_is_seeded_and_in_bounds():
    boxes = [random_resized_crop_box(300, 200, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(s)) for s in range(20)]
    again = [random_resized_crop_box(300, 200, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(s)) for s in range(20)]
    assert boxes == again
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        assert (right - left) * (bottom - top) >= 0.85 * 300 * 200
    img = Image.new("RGB", (300, 200))
    assert ImageTransform(size=32, train=True)(img, random.Random(0)).shape == (3, 32, 32)


def test_torch_normalisation_of_uint8_pixels_is_bit_identical_to_numpy_float32():
    """Workers send uint8 crops and the main process normalises them: every one of the 256 values of every channel
    (CLIP mean/std and TF-style) gives exactly what numpy's float32 path gave, also batched."""
    from moecl.backbone.transforms import to_tensor

    values = np.arange(256, dtype=np.uint8)
    img = Image.fromarray(np.stack([values, values[::-1], np.roll(values, 7)], axis=-1).reshape(16, 16, 3))
    for transform in (ImageTransform(size=16), ImageTransform(size=16, tf_style=True)):
        raw = transform.geometry(img)
        assert raw.dtype == torch.uint8 and raw.shape == (3, 16, 16)
        old = to_tensor(img, transform.mean, transform.std, transform.tf_style)
        assert torch.equal(transform.normalize(raw), old)
        assert torch.equal(transform.normalize(raw.expand(5, 3, 16, 16))[3], old)
        assert torch.equal(transform(img), old)
