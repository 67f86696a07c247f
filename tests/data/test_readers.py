"""Official-layout readers on tiny fixtures written in each dataset's real layout (a few 4x4 images each)."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moecl.data import layouts, readers
from moecl.data.folder import DataError

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def _img(path: Path, value: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value % 256, 7, 9)).save(path, fmt or ("PNG" if path.suffix == ".png" else "JPEG"))
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _rel_keys(ds, base: Path) -> list[str]:
    return sorted(Path(ds.key(i)).relative_to(base).as_posix() for i in range(len(ds)))


# ----------------------------------------------------------------------------------------------------------------
def test_aircraft_variant_lists(tmp_path):
    data = tmp_path / "aircraft" / "fgvc-aircraft-2013b" / "data"
    _write(data / "variants.txt", "707-320\nA300B4\nCessna 172\n")
    train = {"0001": "707-320", "0002": "Cessna 172", "0003": "A300B4"}
    test = {"0004": "Cessna 172", "0005": "707-320"}
    for split, rows in (("train", train), ("test", test), ("val", {"0006": "A300B4"})):
        _write(data / f"images_variant_{split}.txt", "".join(f"{k} {v}\n" for k, v in rows.items()))
        for k in rows:
            _img(data / "images" / f"{k}.jpg")
    _write(data / "images_variant_trainval.txt", "0001 707-320\n0006 A300B4\n")
    ds = readers.read_aircraft(tmp_path / "aircraft", "train")
    assert ds.classnames == ("707-320", "A300B4", "Cessna 172")  # variants.txt order
    assert ds.labels == [0, 2, 1]
    assert Path(ds.key(1)).name == "0002.jpg"
    assert ds[0][0].size == (4, 4)
    assert readers.read_aircraft(tmp_path / "aircraft", "test").labels == [2, 0]
    assert len(readers.read_aircraft(tmp_path / "aircraft", "trainval")) == 2
    # the official top folder itself is accepted too
    assert len(readers.read_aircraft(tmp_path / "aircraft" / "fgvc-aircraft-2013b", "val")) == 1
    with pytest.raises(DataError, match="no split 'all'"):
        readers.read_aircraft(tmp_path / "aircraft", "all")


def _caltech(root: Path, per_class: int = 5) -> Path:
    base = root / "101_ObjectCategories"
    for cls in ("BACKGROUND_Google", "Faces", "accordion", "ant"):
        for i in range(1, per_class + 1):
            _img(base / cls / f"image_{i:04d}.jpg", i)
    return root


def test_caltech101_excludes_background_and_splits_80_20_reproducibly(tmp_path):
    root = _caltech(tmp_path / "a" / "caltech101")
    train = readers.read_caltech101(root, "train")
    test = readers.read_caltech101(root, "test")
    assert train.classnames == ("Faces", "accordion", "ant")  # sorted(), BACKGROUND_Google dropped
    assert len(train) == 12 and len(test) == 3
    assert not set(_rel_keys(train, root)) & set(_rel_keys(test, root))
    assert all("BACKGROUND" not in k for k in _rel_keys(train, root) + _rel_keys(test, root))
    # same split on another machine / location: selection depends only on relative paths
    moved = tmp_path / "elsewhere" / "caltech101"
    shutil.copytree(root, moved)
    assert _rel_keys(readers.read_caltech101(moved, "train"), moved) == _rel_keys(train, root)
    assert _rel_keys(readers.read_caltech101(root, "train"), root) == _rel_keys(train, root)


def _cifar_file(path: Path, labels: list[list[int]], seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.concatenate([np.array(labels, dtype=np.uint8), pixels], axis=1).tofile(path)
    return pixels


def test_cifar10_binary_reader_decodes_pixels_and_labels(tmp_path):
    base = tmp_path / "cifar10" / "cifar-10-batches-bin"
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    _write(base / "batches.meta.txt", "\n".join(names) + "\n\n")
    expected = []
    for b in range(1, 6):
        expected.append(_cifar_file(base / f"data_batch_{b}.bin", [[b], [b + 4]], seed=b))
    test_pixels = _cifar_file(base / "test_batch.bin", [[9], [0], [3]], seed=0)
    train = readers.read_cifar10(tmp_path / "cifar10", "train")
    assert train.classnames == tuple(names) and len(train) == 10
    assert train.labels == [1, 5, 2, 6, 3, 7, 4, 8, 5, 9]
    image, label = train[3]  # batch 2, record 1
    assert label == 6 and image.mode == "RGB" and image.size == (32, 32)
    planes = expected[1][1].reshape(3, 32, 32)
    assert np.array_equal(np.asarray(image), planes.transpose(1, 2, 0))
    test = readers.read_cifar10(tmp_path / "cifar10", "test")
    assert test.labels == [9, 0, 3]
    assert np.array_equal(np.asarray(test[2][0]), test_pixels[2].reshape(3, 32, 32).transpose(1, 2, 0))
    assert len({test.key(i) for i in range(3)}) == 3


def test_cifar100_uses_fine_labels_and_rejects_truncated_files(tmp_path):
    base = tmp_path / "cifar100" / "cifar-100-binary"
    _write(base / "fine_label_names.txt", "".join(f"class_{i}\n" for i in range(100)))
    _cifar_file(base / "train.bin", [[3, 42], [19, 7], [0, 99]], seed=1)  # (coarse, fine)
    _cifar_file(base / "test.bin", [[1, 5]], seed=2)
    train = readers.read_cifar100(tmp_path / "cifar100", "train")
    assert train.labels == [42, 7, 99] and train.classnames[42] == "class_42"
    assert train[2][0].size == (32, 32)
    (base / "test.bin").write_bytes((base / "test.bin").read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        readers.read_cifar100(tmp_path / "cifar100", "test")


def test_dtd_partition_lists(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    for cls in ("banded", "braided", "zigzagged"):
        for i in range(3):
            _img(base / "images" / cls / f"{cls}_{i:04d}.jpg", i)
    _write(base / "labels" / "train1.txt", "banded/banded_0000.jpg\nzigzagged/zigzagged_0001.jpg\n")
    _write(base / "labels" / "test1.txt", "braided/braided_0002.jpg\n")
    _write(base / "labels" / "val1.txt", "banded/banded_0001.jpg\n")
    _write(base / "labels" / "train2.txt", "braided/braided_0000.jpg\n")
    train = readers.read_dtd(tmp_path / "dtd", "train")
    assert train.classnames == ("banded", "braided", "zigzagged")
    assert train.labels == [0, 2]
    assert readers.read_dtd(tmp_path / "dtd", "test").labels == [1]
    assert readers.read_dtd(tmp_path / "dtd", "train", partition=2).labels == [1]


def test_eurosat_official_split_sizes(tmp_path):
    for cls in ("AnnualCrop", "Forest", "SeaLake"):
        for i in range(10):
            _img(tmp_path / "eurosat" / "2750" / cls / f"{cls}_{i + 1}.jpg", i)
    train = readers.read_eurosat(tmp_path / "eurosat", "train")
    test = readers.read_eurosat(tmp_path / "eurosat", "test")
    assert train.classnames == ("AnnualCrop", "Forest", "SeaLake")
    assert (len(train), len(test)) == (24, 6)
    assert sum(train.class_counts()) + sum(test.class_counts()) == 30
    assert readers.read_eurosat(tmp_path / "eurosat", "test").labels == test.labels


def _flowers(root: Path) -> Path:
    for i in range(1, 7):
        _img(root / "jpg" / f"image_{i:05d}.jpg", i)
    return root


def test_flowers_and_cars_without_scipy_name_scipy_and_the_mirror(tmp_path, monkeypatch):
    # None in sys.modules makes `import scipy.io` raise ImportError, as on a machine without scipy
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    root = _flowers(tmp_path / "flowers")
    (root / "imagelabels.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    (root / "setid.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    with pytest.raises(DataError, match="scipy") as info:
        readers.read_flowers(root, "train")
    assert "dpdl-benchmark/oxford_flowers102" in str(info.value)
    cars = tmp_path / "stanford_cars"
    (cars / "devkit").mkdir(parents=True)
    (cars / "devkit" / "cars_meta.mat").write_bytes(b"MATLAB")
    with pytest.raises(DataError, match="scipy") as info:
        readers.read_stanford_cars(cars, "train")
    assert "tanganke/stanford_cars" in str(info.value)


@pytest.mark.skipif(not HAS_SCIPY, reason="needs scipy to write .mat fixtures")
def test_flowers_and_cars_mat_files(tmp_path):
    from scipy.io import savemat

    root = _flowers(tmp_path / "flowers")
    savemat(root / "imagelabels.mat", {"labels": np.array([[3, 1, 2, 3, 1, 2]])})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]), "tstid": np.array([[4, 5, 6]])})
    train = readers.read_flowers(root, "train")
    assert train.classnames == ("1", "2", "3") and train.labels == [2, 0]
    assert readers.read_flowers(root, "test").labels == [2, 0, 1]

    cars = tmp_path / "stanford_cars"
    for split in ("train", "test"):
        for i in range(2):
            _img(cars / f"cars_{split}" / f"{i:05d}.jpg", i)
    (cars / "devkit").mkdir()
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)
    savemat(cars / "devkit" / "cars_meta.mat", {"class_names": names})
    annos = np.array([("00000.jpg", 2), ("00001.jpg", 1)], dtype=[("fname", object), ("class", int)])
    savemat(cars / "devkit" / "cars_train_annos.mat", {"annotations": annos})
    savemat(cars / "cars_test_annos_withlabels.mat", {"annotations": annos[::-1]})
    train = readers.read_stanford_cars(cars, "train")
    assert train.classnames[0] == "AM General Hummer SUV 2000" and train.labels == [1, 0]
    assert readers.read_stanford_cars(cars, "test").labels == [0, 1]


def test_food101_meta_lists(tmp_path):
    base = tmp_path / "food" / "food-101"
    _write(base / "meta" / "classes.txt", "apple_pie\nbaby_back_ribs\n")
    for cls, ids in (("apple_pie", (11, 12)), ("baby_back_ribs", (21, 22))):
        for i in ids:
            _img(base / "images" / cls / f"{i}.jpg", i)
    _write(base / "meta" / "train.txt", "apple_pie/11\nbaby_back_ribs/21\nbaby_back_ribs/22\n")
    _write(base / "meta" / "test.txt", "apple_pie/12\n")
    train = readers.read_food(tmp_path / "food", "train")
    assert train.classnames == ("apple_pie", "baby_back_ribs") and train.labels == [0, 1, 1]
    assert Path(train.key(1)).name == "21.jpg"
    assert readers.read_food(tmp_path / "food", "test").labels == [0]


def _idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_plain_or_gzipped(tmp_path, gz):
    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 5), ("t10k", 3))}
    _idx(root / "train-images-idx3-ubyte", images["train"], gz)
    _idx(root / "train-labels-idx1-ubyte", np.array([5, 0, 4, 1, 9]), gz)
    _idx(root / "t10k-images-idx3-ubyte", images["t10k"], gz)
    _idx(root / "t10k-labels-idx1-ubyte", np.array([7, 2, 1]), gz)
    train = readers.read_mnist(root, "train")
    assert train.classnames == tuple(str(d) for d in range(10)) and train.labels == [5, 0, 4, 1, 9]
    image, _ = train[2]
    assert image.mode == "RGB" and np.array_equal(np.asarray(image)[..., 0], images["train"][2])
    test = readers.read_mnist(root, "test")
    assert test.labels == [7, 2, 1]
    assert layouts.find_base("mnist", root) is not None


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        readers.read_idx(tmp_path / "bad")
    _idx(tmp_path / "short", np.zeros((4, 2, 2)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        readers.read_idx(tmp_path / "short")


def test_oxford_pet_trainval_test_and_torchvision_class_names(tmp_path):
    root = tmp_path / "oxford_pet"
    rows = {
        "trainval": [("Abyssinian_1", 1, 1), ("american_bulldog_10", 2, 2), ("Abyssinian_2", 1, 1)],
        "test": [("great_pyrenees_3", 3, 2), ("american_bulldog_11", 2, 2)],
    }
    for split, entries in rows.items():
        lines = ["#Image CLASS-ID SPECIES BREED ID"] + [f"{i} {c} {s} 1" for i, c, s in entries]
        _write(root / "annotations" / f"{split}.txt", "\n".join(lines) + "\n")
        for image_id, *_ in entries:
            _img(root / "images" / f"{image_id}.jpg")
    train = readers.read_oxford_pet(root, "train")
    assert train.classnames == ("Abyssinian", "American Bulldog", "Great Pyrenees")
    assert train.labels == [0, 1, 0]
    test = readers.read_oxford_pet(root, "test")
    assert test.labels == [2, 1] and Path(test.key(0)).name == "great_pyrenees_3.jpg"


def test_sun397_nested_classes_and_official_split_sizes(tmp_path):
    data = tmp_path / "sun397" / "SUN397"
    _write(data / "ClassName.txt", "/a/abbey\n/a/apartment_building/outdoor\n/b/beach\n")
    for cls in ("a/abbey", "a/apartment_building/outdoor", "b/beach"):
        for i in range(5):
            _img(data / cls / f"sun_{cls.replace('/', '')}{i}.jpg", i)
    _img(data / "a" / "abbey" / "notes.jpg")  # not a sun_*.jpg image: ignored
    train = readers.read_sun397(tmp_path / "sun397", "train")
    test = readers.read_sun397(tmp_path / "sun397", "test")
    assert train.classnames == ("abbey", "apartment_building/outdoor", "beach")
    assert (len(train), len(test)) == (12, 3)
    nested = [train.key(i) for i in range(len(train)) if train.labels[i] == 1]
    assert all("apartment_building/outdoor" in k for k in nested)


def test_tinyimagenet_sorted_wnids_and_val_annotations(tmp_path):
    base = tmp_path / "tinyimagenet" / "tiny-imagenet-200"
    wnids = ["n02124075", "n01443537"]  # wnids.txt order (not sorted), as in the real archive
    for w in wnids:
        for i in range(3):
            _img(base / "train" / w / "images" / f"{w}_{i}.JPEG", i)
        _write(base / "train" / w / f"{w}_boxes.txt", "")
    _img(base / "val" / "images" / "val_0.JPEG")
    _img(base / "val" / "images" / "val_1.JPEG")
    annotations = "val_0.JPEG\tn02124075\t0\t0\t8\t8\nval_1.JPEG\tn01443537\t0\t0\t8\t8\n"
    _write(base / "val" / "val_annotations.txt", annotations)
    _write(base / "wnids.txt", "\n".join(wnids) + "\n")
    train = readers.read_tinyimagenet(tmp_path / "tinyimagenet", "train")
    assert train.classnames == ("n01443537", "n02124075")  # index = sorted wnids
    assert train.class_counts() == [3, 3]
    test = readers.read_tinyimagenet(tmp_path / "tinyimagenet", "test")
    assert test.split == "test" and test.labels == [1, 0]
    assert readers.read_tinyimagenet(tmp_path / "tinyimagenet", "val").labels == [1, 0]
    # the val/images folder would look like an ImageFolder class; the official-layout marker wins
    assert layouts.find_base("tinyimagenet", tmp_path / "tinyimagenet") is not None


def test_missing_official_layout_says_how_to_download(tmp_path):
    (tmp_path / "food").mkdir()
    with pytest.raises(DataError, match=r"moecl data download food --root"):
        readers.read_food(tmp_path / "food", "train")
    assert layouts.find_base("food", tmp_path / "food") is None
    with pytest.raises(DataError, match="no official-layout reader"):
        readers.read_official("clothing", tmp_path, "train")


@pytest.mark.skipif(HAS_DATASETS, reason="`datasets` installed: the clear-error path is not reachable")
def test_hf_reader_without_datasets_package_is_a_clear_error():
    with pytest.raises(DataError, match="pip install datasets"):
        readers.read_hf("uoft-cs/cifar10", "test")


def test_array_sources_survive_pickling(tmp_path):
    import pickle

    base = tmp_path / "cifar10" / "cifar-10-batches-bin"
    _write(base / "batches.meta.txt", "\n".join("abcdefghij") + "\n")
    pixels = _cifar_file(base / "test_batch.bin", [[4]], seed=5)
    ds = readers.read_cifar10(tmp_path / "cifar10", "test")
    ds[0]  # load the array in this process, then ship the dataset like a spawn DataLoader worker would
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(np.asarray(clone[0][0]), pixels[0].reshape(3, 32, 32).transpose(1, 2, 0))
