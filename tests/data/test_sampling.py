from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from moecl.data.folder import ImageDataset, ZipSource, read_image_zip
from moecl.data.sampling import derive_seed, limit_per_class, per_class_indices, random_subset


def _keys_labels(n_classes: int = 4, per_class: int = 12) -> tuple[list[str], list[int]]:
    keys = [f"/data/c{c}/img_{i:03d}.png" for c in range(n_classes) for i in range(per_class)]
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    return keys, labels


def test_derive_seed_is_stable_across_processes_and_machines():
    # sha256-based: a fixed value, never Python's per-process salted hash()
    assert derive_seed(42, "mnist", "shots") == 8658394388952849293
    assert derive_seed(42, "mnist", "shots") == int.from_bytes(hashlib.sha256(b"42/mnist/shots").digest()[:8], "little")
    assert derive_seed(42, "mnist") != derive_seed(42, "cifar10") != derive_seed(43, "mnist")


def test_five_shot_is_deterministic_and_independent_of_listing_order():
    keys, labels = _keys_labels()
    first = per_class_indices(keys, labels, 5, seed=42, tag="mnist/shots")
    assert first == per_class_indices(keys, labels, 5, seed=42, tag="mnist/shots")
    chosen = {keys[i] for i in first}
    assert len(chosen) == 20
    assert [labels[i] for i in first] == [c for c in range(4) for _ in range(5)]
    order = list(range(len(keys)))
    random.Random(0).shuffle(order)
    shuffled = per_class_indices([keys[i] for i in order], [labels[i] for i in order], 5, seed=42, tag="mnist/shots")
    assert {keys[order[i]] for i in shuffled} == chosen
    other = per_class_indices(keys, labels, 5, seed=43, tag="mnist/shots")
    assert {keys[i] for i in other} != chosen


def test_small_classes_keep_all_images_and_k_must_be_positive():
    keys, labels = ["a1", "a2", "b1"], [0, 0, 1]
    assert per_class_indices(keys, labels, 5, seed=0) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 1"):
        per_class_indices(keys, labels, 0, seed=0)


def test_limit_per_class_on_real_images_is_reproducible(bundled_root: Path):
    a = limit_per_class(read_image_zip(bundled_root / "mnist.zip", "train"), 5, 42, "mnist/shots")
    b = limit_per_class(read_image_zip(bundled_root / "mnist.zip", "train"), 5, 42, "mnist/shots")
    assert len(a) == 50 and a.class_counts() == [5] * 10
    assert [a.key(i) for i in range(len(a))] == [b.key(i) for i in range(len(b))]
    assert limit_per_class(a, None, 42) is a


def test_random_subset_ignores_listing_order():
    items = [(ZipSource("/x.zip", f"test/c/{i}.png"), 0) for i in range(30)]
    ds = ImageDataset("x", "test", ("c",), items)
    rev = ImageDataset("x", "test", ("c",), items[::-1])
    a, b = random_subset(ds, 7, 1, "ref"), random_subset(rev, 7, 1, "ref")
    assert len(a) == 7 and {a.key(i) for i in range(7)} == {b.key(i) for i in range(7)}
    assert random_subset(ds, None, 1) is ds and random_subset(ds, 100, 1) is ds
