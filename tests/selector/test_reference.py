"""The DDAS reference images: ours (every split) and the official code's (train split, k per class)."""

from __future__ import annotations

import pytest

from moecl.config import SelectorConfig
from moecl.data.folder import DataError
from moecl.methods.moe_adapters import lr_epoch_rows
from moecl.selector.reference import reference_images

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (40, 200, 40)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, image_folder):
    return image_folder(tmp_path_factory.mktemp("ref"), COLOURS, {"train": 6, "val": 4})


def test_default_reference_reads_every_split(folder):
    ds = reference_images(SelectorConfig(reference=str(folder)), None)
    assert len(ds) == 3 * (6 + 4) and ds.split == "train+val"


def test_official_reference_is_the_train_split_k_per_class(folder):
    sel = SelectorConfig(reference=str(folder), reference_splits=("train",), reference_shots=2)
    ds = reference_images(sel, None, seed=42)
    assert len(ds) == 3 * 2 and ds.class_counts() == [2, 2, 2]
    assert all(f"{folder}/train/" in ds.key(i) for i in range(len(ds)))
    assert ds.split == "train"
    # the reference AE's LR epoch is a pass over the whole train split, as the official full train loader
    assert lr_epoch_rows(ds) == 3 * 6
    # seeded: the same shots in every run with the same seed
    again = reference_images(sel, None, seed=42)
    assert [again.key(i) for i in range(len(again))] == [ds.key(i) for i in range(len(ds))]


def test_a_missing_reference_split_is_an_error(folder):
    with pytest.raises(DataError, match="no split train2017"):
        reference_images(SelectorConfig(reference=str(folder), reference_splits=("train2017",)), None)
