from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moecl.data.folder import (
    ArraySource,
    BadImageError,
    DataError,
    FileSource,
    ImageDataset,
    ZipSource,
    list_splits,
    open_folder_or_zip,
    read_image_folder,
    read_image_zip,
)


def _manifest(root: Path) -> dict:
    return json.loads((root / "MANIFEST.json").read_text())["datasets"]


def test_read_image_zip_real_clothing_matches_manifest(data_root: Path):
    meta = _manifest(data_root)["clothing"]
    path = data_root / "clothing.zip"
    assert list_splits(path) == sorted(meta["splits"])
    for split, total in meta["splits"].items():
        ds = read_image_zip(path, split)
        assert ds.name == "clothing" and ds.split == split
        assert list(ds.classnames) == sorted(meta["images_per_class"][split])  # sorted(), like ImageFolder
        assert len(ds) == total
        assert dict(zip(ds.classnames, ds.class_counts(), strict=True)) == meta["images_per_class"][split]
    img, label = ds[len(ds) - 1]
    assert img.mode == "RGB" and max(img.size) <= 160
    assert ds.classnames[label] == "t-shirt"
    assert ds.key(0).startswith(str(path.resolve()) + "::test/dress/")


def test_read_image_zip_real_grayscale_mnist_is_rgb(bundled_root: Path):
    ds = read_image_zip(bundled_root / "mnist.zip", "test")
    assert ds.classnames == tuple(str(i) for i in range(10))
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (28, 28) and label == 0
    pixels = np.asarray(img)
    assert (pixels[..., 0] == pixels[..., 1]).all()  # grey replicated into three channels


def test_folder_and_zip_readers_agree(make_folder, tmp_path: Path):
    root = make_folder("toy", {"train": {"b_cls": 2, "a_cls": 3}, "test": {"a_cls": 1, "b_cls": 1}})
    (root / "train" / "a_cls" / "notes.txt").write_text("not an image")
    (root / "train" / "a_cls" / ".hidden.png").write_bytes(b"")
    zpath = tmp_path / "toy.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in sorted(root.rglob("*")):
            z.write(f, f"toy/{f.relative_to(root).as_posix()}")  # one top folder: allowed
    folder, zipped = read_image_folder(root, "train"), read_image_zip(zpath, "train")
    assert folder.classnames == zipped.classnames == ("a_cls", "b_cls")
    assert folder.labels == zipped.labels == [0, 0, 0, 1, 1]
    assert np.array_equal(np.asarray(folder[4][0]), np.asarray(zipped[4][0]))
    assert list_splits(zpath) == list_splits(root) == ["test", "train"]
    assert open_folder_or_zip(zpath, "test").name == "toy"


def test_missing_split_lists_present_splits(make_folder, data_root: Path):
    root = make_folder("toy", {"train": {"a": 1}, "val": {"a": 1}})
    with pytest.raises(DataError, match=r"no split 'test' \(splits present: train, val\)"):
        read_image_folder(root, "test")
    present = ", ".join(list_splits(data_root / "clothing.zip"))  # test, train(, validation in the full copy)
    with pytest.raises(DataError, match=rf"no split 'val' \(splits present: {present}\)"):
        read_image_zip(data_root / "clothing.zip", "val")
    with pytest.raises(DataError, match="not found"):
        open_folder_or_zip(root.parent / "nope.zip", "train")


def test_empty_class_is_kept_and_counted(make_folder):
    ds = read_image_folder(make_folder("toy", {"train": {"a": 2, "empty": 0, "z": 1}}), "train")
    assert ds.classnames == ("a", "empty", "z")
    assert ds.class_counts() == [2, 0, 1]
    assert ds.labels == [0, 0, 2]


def _corrupt_folder(make_folder) -> tuple[Path, Path, Path]:
    root = make_folder("toy", {"train": {"cat": 2}})
    garbage = root / "train" / "cat" / "broken.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "JPEG")
    truncated = root / "train" / "cat" / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root, garbage, truncated


def test_corrupt_image_raises_clear_error_naming_file(make_folder):
    root, garbage, truncated = _corrupt_folder(make_folder)
    ds = read_image_folder(root, "train")
    keys = [ds.key(i) for i in range(len(ds))]
    for bad in (garbage, truncated):
        with pytest.raises(BadImageError) as info:
            ds[keys.index(str(bad.resolve()))]
        assert str(bad.resolve()) in str(info.value)
        assert "on_bad_image: skip" in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI turns it into one `error:` line


def test_corrupt_image_skip_mode_counts(make_folder):
    root, _, _ = _corrupt_folder(make_folder)
    ds = read_image_folder(root, "train", on_bad_image="skip")
    results = [ds[i] for i in range(len(ds))]
    assert sum(img is None for img, _ in results) == 2 and ds.skipped == 2
    assert all(label == 0 for _, label in results)
    with pytest.raises(DataError, match="on_bad_image"):
        read_image_folder(root, "train", on_bad_image="ignore")


def test_bad_member_in_zip_names_archive_and_member(tmp_path: Path):
    zpath = tmp_path / "bad.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("train/x/ok.png", _png_bytes())
        z.writestr("train/x/bad.png", b"garbage")
    ds = read_image_zip(zpath, "train")
    with pytest.raises(BadImageError, match=rf"{zpath.resolve()}::train/x/bad.png"):
        ds[0]


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3, 3), 128).save(buf, "PNG")
    return buf.getvalue()


def _read_in_child(ds: ImageDataset, conn) -> None:
    img, label = ds[1]
    conn.send((np.asarray(img).tolist(), label))
    conn.close()


def test_zip_handle_survives_pickle_and_fork(bundled_root: Path):
    ds = read_image_zip(bundled_root / "cifar10.zip", "test")
    expected = np.asarray(ds[1][0])  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(np.asarray(clone[1][0]), expected)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_in_child, args=(ds, child))
    proc.start()
    pixels, label = parent.recv()
    proc.join(timeout=30)
    assert proc.exitcode == 0 and label == 0
    assert np.array_equal(np.asarray(pixels, dtype=np.uint8), expected)
    assert np.array_equal(np.asarray(ds[1][0]), expected)  # the parent's handle still works


def test_array_source_and_dataset_views():
    gray = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    sources = [ArraySource(gray, 0, "arr::0"), ArraySource(lambda i: gray[i], 1, "arr::1")]
    ds = ImageDataset("arr", "train", ("a", "b"), [(sources[0], 0), (sources[1], 1)])
    img, label = ds[1]
    assert img.mode == "RGB" and img.size == (5, 5) and label == 1
    assert np.asarray(img)[0, 0, 2] == gray[1, 0, 0]
    assert ds.subset([1]).labels == [1] and ds.subset([1]).key(0) == "arr::1"
    renamed = ds.with_classnames(("A", "B"))
    assert renamed.classnames == ("A", "B") and renamed.key(0) == "arr::0"
    step = ds.relabel([1])
    assert step.classnames == ("b",) and step.labels == [0] and step.key(0) == "arr::1"
    with pytest.raises(DataError, match="2 classes"):
        ds.with_classnames(("only one",))
    with pytest.raises(DataError, match="outside 0..1"):
        ImageDataset("arr", "train", ("a", "b"), [(sources[0], 2)])


def test_sources_have_stable_keys(tmp_path: Path):
    assert FileSource(tmp_path / "a.png").key == str((tmp_path / "a.png").resolve())
    assert ZipSource(tmp_path / "d.zip", "train/c/x.png").key == f"{(tmp_path / 'd.zip').resolve()}::train/c/x.png"
