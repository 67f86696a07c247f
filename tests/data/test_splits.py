"""The Caltech101 / EuroSAT / SUN397 splits equal the official ones: torchvision's listing (transcribed below from
torchvision 0.16) cut by `torch.utils.data.random_split(..., generator=torch.Generator().manual_seed(42))`, the rule
of MoE-Adapters4CL / ZSCL mtil/src/datasets/collections.py, on fixture trees of each dataset's real layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from moecl.data import readers, splits
from moecl.data.folder import DataError


def _img(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value % 256, 3, 5)).save(path, "PNG" if path.suffix == ".png" else "JPEG")


def _official(listing: list, split: str) -> list:
    """The official rule, verbatim: int(0.8 n) train, the rest test, random_split with a seed-42 generator."""
    train_size = int(0.8 * len(listing))
    train, test = torch.utils.data.random_split(
        listing, [train_size, len(listing) - train_size], generator=torch.Generator().manual_seed(42)
    )
    return [listing[i] for i in (train if split == "train" else test).indices]


def _as_items(ds) -> list[tuple[str, int]]:
    return [(ds.key(i), ds.labels[i]) for i in range(len(ds))]


@pytest.mark.parametrize("n", [2, 10, 37, 8677])
def test_official_split_is_random_split_with_a_seed_42_generator(n):
    listing = list(range(n))
    for split in ("train", "test"):
        assert splits.official_split(n, split) == _official(listing, split)
    assert splits.official_sizes(n) == (int(0.8 * n), n - int(0.8 * n))
    assert splits.official_split(n, "all") == listing
    with pytest.raises(DataError, match="splits: train, test, all"):
        splits.official_split(n, "val")


def _torchvision_caltech101(root: Path) -> list[tuple[str, int]]:
    """torchvision.datasets.Caltech101's (path, label) list (caltech.py)."""
    categories = sorted(os.listdir(os.path.join(root, "101_ObjectCategories")))
    categories.remove("BACKGROUND_Google")
    items = []
    for i, c in enumerate(categories):
        n = len(os.listdir(os.path.join(root, "101_ObjectCategories", c)))
        items += [(os.path.join(root, "101_ObjectCategories", c, f"image_{j:04d}.jpg"), i) for j in range(1, n + 1)]
    return items


def test_caltech101_split_equals_the_official_one(tmp_path):
    base = tmp_path / "caltech101"  # torchvision's folder: <location>/caltech101/101_ObjectCategories
    # upper case sorts first (Faces, Leopards before accordion), "a-b" vs "a": the listing order is sorted(listdir)
    counts = {"Faces": 7, "Faces_easy": 3, "Leopards": 4, "accordion": 5, "a-b": 2, "a": 6, "BACKGROUND_Google": 4}
    for c, (cls, n) in enumerate(counts.items()):
        for j in range(n, 0, -1):  # created in reverse: the listing must not depend on creation order
            _img(base / "101_ObjectCategories" / cls / f"image_{j:04d}.jpg", c * 10 + j)
    expected = _torchvision_caltech101(base)
    assert len(expected) == 27
    for split in ("train", "test"):
        ds = readers.read_caltech101(base, split)
        assert _as_items(ds) == _official(expected, split)
        assert ds.classnames == ("Faces", "Faces_easy", "Leopards", "a", "a-b", "accordion")
    assert len(readers.read_caltech101(base, "train")) == 21


def test_caltech101_folder_with_other_files_is_refused_like_the_official_numbering(tmp_path):
    base = tmp_path / "caltech101"
    for j in (1, 2):
        _img(base / "101_ObjectCategories" / "ant" / f"image_{j:04d}.jpg", j)
    (base / "101_ObjectCategories" / "ant" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="image_0003.jpg"):
        readers.read_caltech101(base, "train")


_TV_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _torchvision_image_folder(directory: Path) -> list[tuple[str, int]]:
    """torchvision.datasets.ImageFolder's samples (folder.py find_classes + make_dataset), which EuroSAT is."""
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    class_to_idx = {cls_name: i for i, cls_name in enumerate(classes)}
    instances = []
    for target_class in sorted(class_to_idx.keys()):
        target_dir = os.path.join(directory, target_class)
        for root, _, fnames in sorted(os.walk(target_dir, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(_TV_IMG_EXTENSIONS):
                    instances.append((os.path.join(root, fname), class_to_idx[target_class]))
    return instances


def test_eurosat_split_equals_the_official_one(tmp_path):
    data = tmp_path / "eurosat" / "2750"  # torchvision: <location>/eurosat/2750/<class>/<Class>_<n>.jpg
    for c, cls in enumerate(("SeaLake", "AnnualCrop", "Forest", "HerbaceousVegetation")):
        for j in (10, 2, 1, 11, 3, 7, 5):  # numeric names: sorted() puts _10, _11 before _2, as torchvision does
            _img(data / cls / f"{cls}_{j}.jpg", c * 20 + j)
    _img(data / "Forest" / "extra" / "Forest_99.png", 1)  # ImageFolder walks subfolders too
    (data / "Forest" / "readme.txt").write_text("not an image")
    expected = _torchvision_image_folder(data)
    assert len(expected) == 29
    for split in ("train", "test"):
        ds = readers.read_eurosat(tmp_path / "eurosat", split)
        assert _as_items(ds) == _official(expected, split)
    assert readers.read_eurosat(tmp_path / "eurosat", "train").classnames[0] == "AnnualCrop"


def _sun397_tree(data: Path) -> None:
    classes = ["a/abbey", "a/apartment_building/outdoor", "b/beach", "a/airport_terminal", "b/bakery/shop"]
    (data / "ClassName.txt").parent.mkdir(parents=True, exist_ok=True)
    (data / "ClassName.txt").write_text("".join(f"/{c}\n" for c in sorted(classes)))
    for c, cls in enumerate(classes):
        for j in (3, 1, 4, 0, 2):
            _img(data / cls / f"sun_{chr(97 + (j * 7 + c) % 26)}{j}{c}.jpg", c * 5 + j)
    _img(data / "a" / "apartment_building" / "sun_direct.jpg", 1)  # directly in a parent of a nested class
    _img(data / "a" / "abbey" / "notes.jpg", 2)  # not sun_*.jpg: not listed


def _torchvision_sun397(data: Path) -> list[tuple[str, int]]:
    """torchvision.datasets.SUN397's (path, label) list (sun397.py), files outside the classes left out."""
    with open(data / "ClassName.txt") as f:
        classes = [c[3:].strip() for c in f]
    class_to_idx = dict(zip(classes, range(len(classes)), strict=True))
    files = list(data.rglob("sun_*.jpg"))
    keys = ["/".join(p.relative_to(data).parts[1:-1]) for p in files]
    return [(str(p), class_to_idx[k]) for p, k in zip(files, keys, strict=True) if k in class_to_idx]


def test_rglob_order_replays_pathlib(tmp_path):
    data = tmp_path / "SUN397"
    _sun397_tree(data)
    ours = splits.rglob_order(data, "sun_*.jpg")
    assert len(ours) == 26 and sorted(ours) == sorted(data.rglob("sun_*.jpg"))
    # each directory's own matches, then its subdirectories depth-first, in os.scandir order
    position = {p: i for i, p in enumerate(ours)}
    direct = data / "a" / "apartment_building" / "sun_direct.jpg"
    nested = [p for p in ours if p.parent.name == "outdoor"]
    assert all(position[direct] < position[p] for p in nested)
    if sys.version_info < (3, 12):  # the official environment's pathlib (3.9) walks in this order up to 3.11
        assert ours == list(data.rglob("sun_*.jpg"))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the reference listing uses Python 3.9-3.11's Path.rglob")
def test_sun397_split_equals_the_official_one(tmp_path):
    data = tmp_path / "SUN397"  # torchvision: <location>/SUN397/<letter>/<class>[/<sub>]/sun_*.jpg
    _sun397_tree(data)
    expected = _torchvision_sun397(data)
    assert len(expected) == 25
    for split in ("train", "test"):
        ds = readers.read_sun397(tmp_path, split)
        assert _as_items(ds) == _official(expected, split)
    assert len(readers.read_sun397(tmp_path, "train")) == 20
