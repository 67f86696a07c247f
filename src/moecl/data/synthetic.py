"""Synthetic image tasks generated on demand: scale models of a stream at any size, in constant memory.

Image i of a split is drawn from a generator seeded by (seed, split, i) when it is read, so a split of 8,000 images
costs the same host memory as one of 50 (nothing is stored but the labels), and every read of an image returns the
same pixels. Each class has its own mean colour, so the tasks are learnable; the images go through the real
decode -> transform -> batch pipeline like any dataset's (ArraySource). Used by `moecl bench memory`.
"""

from __future__ import annotations

import zlib

import numpy as np

from moecl.data.folder import ArraySource, ImageDataset
from moecl.data.tasks import Task, TaskStream

TEMPLATES = ("a photo of a {}.",)


class SyntheticImages:
    """Callable index -> uint8 (size, size, 3) image: the class colour of `labels[index]` plus seeded noise."""

    def __init__(self, labels: list[int], classes: int, size: int, seed: int):
        self.labels = labels
        self.size = int(size)
        self.seed = int(seed)
        palette = np.random.default_rng(seed).integers(30, 226, size=(classes, 3))
        self.palette = palette.astype(np.int16)

    def __call__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, int(index)))
        noise = rng.integers(-30, 31, size=(self.size, self.size, 3), dtype=np.int16)
        return np.clip(self.palette[self.labels[index]] + noise, 0, 255).astype(np.uint8)


def synthetic_dataset(name: str, split: str, classes: int, n: int, size: int, seed: int) -> ImageDataset:
    """`n` images of `classes` classes (balanced, in class order), `size` px square; keys `name/split#i`."""
    if classes < 1 or n < 1 or size < 1:
        raise ValueError(f"synthetic dataset {name}/{split}: classes, n and size must be >= 1")
    labels = [i * classes // n for i in range(n)]
    # The split's seed mixes the stream seed with the dataset and split names (crc32: stable across runs).
    images = SyntheticImages(labels, classes, size, seed * 1_000_003 + zlib.crc32(f"{name}/{split}".encode()))
    items = [(ArraySource(images, i, f"{name}/{split}#{i}"), label) for i, label in enumerate(labels)]
    return ImageDataset(name, split, [f"{name} class {c}" for c in range(classes)], items)


def synthetic_stream(
    tasks: int, classes: int, train: int, test: int, size: int, seed: int = 0, name: str = "synthetic"
) -> TaskStream:
    """A multi-domain stream of `tasks` synthetic datasets (`train` / `test` images each, `classes` classes)."""
    built = []
    for t in range(tasks):
        dataset = f"{name}{t}"
        built.append(
            Task(
                name=dataset,
                dataset=dataset,
                classnames=tuple(f"{dataset} class {c}" for c in range(classes)),
                templates=TEMPLATES,
                train=synthetic_dataset(dataset, "train", classes, train, size, seed),
                test=synthetic_dataset(dataset, "test", classes, test, size, seed),
            )
        )
    return TaskStream(name, "mtil", tuple(built))
