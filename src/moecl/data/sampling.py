"""Seeded, machine-independent subsampling: k images per class (few-shot) and per-class caps.

Identical across runs, machines and the order in which a reader lists files: items are sorted by their stable key
before drawing, and each (seed, dataset, purpose, class) gets its own numpy PCG64 stream derived with sha256 (never
Python's salted `hash`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from moecl.data.folder import ImageDataset


def derive_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed from `seed` and any labels (dataset name, purpose, class), stable across processes."""
    text = "/".join([str(seed), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def generator(seed: int, *parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *parts)))


def per_class_indices(
    keys: Sequence[str], labels: Sequence[int], k: int, seed: int, tag: str = ""
) -> list[int]:
    """Indices of at most `k` items per label, chosen uniformly at random; the same items whatever the order of
    (keys, labels). Returned in (label, key) order."""
    if k < 1:
        raise ValueError(f"images per class must be at least 1, got {k}")
    by_class: dict[int, list[int]] = {}
    for i in sorted(range(len(keys)), key=lambda i: keys[i]):
        by_class.setdefault(int(labels[i]), []).append(i)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) > k:
            pick = generator(seed, tag, label).permutation(len(members))[:k]
            members = [members[p] for p in sorted(pick.tolist())]
        chosen += members
    return chosen


def limit_per_class(dataset: ImageDataset, k: int | None, seed: int, tag: str = "") -> ImageDataset:
    """`dataset` with at most k images per class (seeded, stratified); None = unchanged."""
    if k is None:
        return dataset
    keys = [dataset.key(i) for i in range(len(dataset))]
    return dataset.subset(per_class_indices(keys, dataset.labels, k, seed, tag))


def random_subset(dataset: ImageDataset, n: int | None, seed: int, tag: str = "") -> ImageDataset:
    """At most n images drawn uniformly (seeded, independent of listing order); None = unchanged."""
    if n is None or n >= len(dataset):
        return dataset
    order = sorted(range(len(dataset)), key=dataset.key)
    pick = generator(seed, tag, "subset").permutation(len(order))[:n]
    return dataset.subset(order[p] for p in sorted(pick.tolist()))
