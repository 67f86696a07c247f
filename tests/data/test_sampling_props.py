"""Property tests (hypothesis) of the seeded few-shot / per-class sampler: exact counts, no duplicates, the same
images whatever order a reader lists them in, nested k-shot sets, and the same for random_subset."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from moecl.data.folder import ImageDataset, ZipSource
from moecl.data.sampling import derive_seed, limit_per_class, per_class_indices, random_subset

# A listing: distinct keys with a label each (labels 0..4, any class sizes, possibly empty classes).
listings = st.dictionaries(
    st.text(alphabet="abcdefghij/._0123456789", min_size=1, max_size=12), st.integers(0, 4), max_size=40
)
seeds = st.integers(0, 2**32)
tags = st.sampled_from(["", "mnist/shots", "cifar10/train"])
SETTINGS = settings(max_examples=60, deadline=None)


def _shuffled(listing: dict[str, int], shuffle_seed: int) -> tuple[list[str], list[int]]:
    keys = list(listing)
    random.Random(shuffle_seed).shuffle(keys)
    return keys, [listing[k] for k in keys]


@SETTINGS
@given(listings, st.integers(1, 8), seeds, tags, st.integers(0, 1000))
def test_per_class_counts_order_and_listing_independence(listing, k, seed, tag, shuffle_seed):
    keys, labels = _shuffled(listing, shuffle_seed)
    chosen = per_class_indices(keys, labels, k, seed, tag)
    assert len(set(chosen)) == len(chosen) and all(0 <= i < len(keys) for i in chosen)
    for label in set(labels):
        assert sum(labels[i] == label for i in chosen) == min(k, labels.count(label))  # exactly k, or all if fewer
    assert [(labels[i], keys[i]) for i in chosen] == sorted((labels[i], keys[i]) for i in chosen)
    # the same images whatever order the files were listed in, and again on a second call
    other_keys, other_labels = _shuffled(listing, shuffle_seed + 1)
    again = per_class_indices(other_keys, other_labels, k, seed, tag)
    assert [other_keys[i] for i in again] == [keys[i] for i in chosen]


@SETTINGS
@given(listings, st.integers(1, 7), seeds, tags)
def test_k_shot_sets_are_nested(listing, k, seed, tag):
    keys, labels = list(listing), list(listing.values())
    smaller = {keys[i] for i in per_class_indices(keys, labels, k, seed, tag)}
    larger = {keys[i] for i in per_class_indices(keys, labels, k + 1, seed, tag)}
    assert smaller <= larger  # growing k only adds images: a 1-shot run's images are in the 2-shot run


def _dataset(listing: dict[str, int], shuffle_seed: int) -> ImageDataset:
    keys, labels = _shuffled(listing, shuffle_seed)
    items = [(ZipSource("/d.zip", key), label) for key, label in zip(keys, labels, strict=True)]
    return ImageDataset("d", "train", [f"c{c}" for c in range(5)], items)


def _keys(ds: ImageDataset) -> list[str]:
    return [ds.key(i) for i in range(len(ds))]


@SETTINGS
@given(listings, st.one_of(st.none(), st.integers(1, 6)), seeds, st.integers(0, 1000))
def test_limit_per_class_dataset(listing, k, seed, shuffle_seed):
    ds = _dataset(listing, shuffle_seed)
    limited = limit_per_class(ds, k, seed, "t")
    if k is None:
        assert limited is ds
        return
    assert limited.class_counts() == [min(k, n) for n in ds.class_counts()]
    assert set(_keys(limited)) <= set(_keys(ds))
    assert _keys(limit_per_class(_dataset(listing, shuffle_seed + 1), k, seed, "t")) == _keys(limited)


@SETTINGS
@given(listings, st.one_of(st.none(), st.integers(0, 50)), seeds, st.integers(0, 1000))
def test_random_subset_size_membership_and_listing_independence(listing, n, seed, shuffle_seed):
    ds = _dataset(listing, shuffle_seed)
    sub = random_subset(ds, n, seed, "ref")
    assert len(sub) == (len(ds) if n is None else min(n, len(ds)))
    assert len(set(_keys(sub))) == len(sub) and set(_keys(sub)) <= set(_keys(ds))
    again = random_subset(_dataset(listing, shuffle_seed + 1), n, seed, "ref")
    assert sorted(_keys(again)) == sorted(_keys(sub))


@SETTINGS
@given(seeds, st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=4))
def test_derive_seed_is_a_stable_64_bit_value(seed, parts):
    value = derive_seed(seed, *parts)
    assert 0 <= value < 2**64 and value == derive_seed(seed, *parts)
