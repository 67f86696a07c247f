"""Synthetic streams: deterministic images generated on read, balanced labels, unique keys, nothing stored."""

from __future__ import annotations

import numpy as np
import pytest

from moecl.data.synthetic import SyntheticImages, synthetic_dataset, synthetic_stream


def test_images_are_the_same_on_every_read_and_differ_between_images_and_splits():
    stream = synthetic_stream(tasks=2, classes=3, train=12, test=6, size=20, seed=1)
    train = stream.tasks[0].train
    first, again = np.asarray(train[4][0]), np.asarray(train[4][0])
    assert first.shape == (20, 20, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, np.asarray(train[5][0]))
    assert not np.array_equal(first, np.asarray(stream.tasks[1].train[4][0]))
    assert not np.array_equal(np.asarray(stream.tasks[0].test[4][0]), first)


def test_labels_are_balanced_keys_unique_and_the_stream_is_multi_domain():
    stream = synthetic_stream(tasks=3, classes=4, train=20, test=8, size=8)
    assert stream.kind == "mtil" and len(stream) == 3
    for task in stream.tasks:
        assert task.train.class_counts() == [5, 5, 5, 5] and task.test.class_counts() == [2, 2, 2, 2]
        assert len(task.classnames) == 4 and task.templates[0].format("x") == "a photo of a x."
    keys = [ds.key(i) for t in stream.tasks for ds in (t.train, t.test) for i in range(len(ds))]
    assert len(keys) == len(set(keys)) == 3 * 28


def test_classes_have_distinct_mean_colours_and_nothing_but_labels_is_stored():
    ds = synthetic_dataset("d", "train", classes=2, n=40, size=16, seed=0)
    means = [np.mean([np.asarray(ds[i][0]).mean(axis=(0, 1)) for i in range(len(ds)) if ds[i][1] == c], 0)
             for c in (0, 1)]  # fmt: skip
    assert np.abs(means[0] - means[1]).max() > 10
    images = ds.items[0][0].provider
    assert isinstance(images, SyntheticImages) and images.palette.shape == (2, 3)
    assert not any(isinstance(v, np.ndarray) and v.size > 6 for v in vars(images).values())


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        synthetic_dataset("d", "train", classes=0, n=4, size=8, seed=0)
