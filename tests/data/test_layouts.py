"""Data roots people already have: a torchvision / ZSCL / official-archive folder of every dataset is found under a
data root (layouts.LAYOUTS), read by its reader, and reported by `moecl data list --root DIR`."""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moecl.cli import main
from moecl.data import layouts, readers, registry
from moecl.data.folder import DataError

# Flowers102 / Stanford Cars keep labels in .mat files: written (and read) with scipy when it is installed,
# otherwise only their marker files are written and only finding them is checked
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
NEEDS_SCIPY = {"flowers", "stanford_cars"}


def savemat(path: Path, content: dict) -> None:
    if HAS_SCIPY:
        from scipy.io import savemat as write

        write(path, content)
    else:
        path.write_bytes(b"MATLAB 5.0 MAT-file")


def _img(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value % 256, 1, 2)).save(path, "PNG" if path.suffix == ".png" else "JPEG")


def _text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _cifar_batch(path: Path, label_key: str, n: int = 5) -> None:
    data = np.arange(n * 3072, dtype=np.int64).reshape(n, 3072).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({label_key: [i % 2 for i in range(n)], "data": data}, protocol=4))


# Each writes a minimal readable copy of the dataset into `base`, the folder that holds its official files.
def _aircraft(base: Path) -> None:
    _text(base / "data" / "variants.txt", "707-320\nA300B4\n")
    _text(base / "data" / "images_variant_train.txt", "0001 707-320\n0002 A300B4\n")
    for i in (1, 2):
        _img(base / "data" / "images" / f"000{i}.jpg", i)


def _caltech101(base: Path) -> None:
    for cls in ("accordion", "BACKGROUND_Google"):
        for i in range(1, 6):
            _img(base / "101_ObjectCategories" / cls / f"image_{i:04d}.jpg", i)


def _cifar10_python(base: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane", "automobile"]}, protocol=4))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _cifar_batch(base / name, "labels")


def _cifar100_python(base: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "aquarium_fish"]}, protocol=4))
    for name in ("train", "test"):
        _cifar_batch(base / name, "fine_labels")


def _cifar10_binary(base: Path) -> None:
    _text(base / "batches.meta.txt", "airplane\nautomobile\n")
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (base / name).write_bytes(bytes([1]) + bytes(3072))


def _cifar100_binary(base: Path) -> None:
    _text(base / "fine_label_names.txt", "apple\naquarium_fish\n")
    for name in ("train.bin", "test.bin"):
        (base / name).write_bytes(bytes([0, 1]) + bytes(3072))


def _dtd(base: Path) -> None:
    _img(base / "images" / "banded" / "banded_0001.jpg")
    _text(base / "labels" / "train1.txt", "banded/banded_0001.jpg\n")


def _eurosat(base: Path) -> None:
    for i in range(1, 6):
        _img(base / "2750" / "Forest" / f"Forest_{i}.jpg", i)


def _flowers(base: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    _img(base / "jpg" / "image_00001.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array([[1]])})
    savemat(base / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[1]]), "tstid": np.array([[1]])})


def _food(base: Path) -> None:
    _text(base / "meta" / "classes.txt", "apple_pie\n")
    _text(base / "meta" / "train.txt", "apple_pie/1\n")
    _img(base / "images" / "apple_pie" / "1.jpg")


def _mnist(base: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    (base / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2]) + bytes(4))
    (base / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))


def _oxford_pet(base: Path) -> None:
    _text(base / "annotations" / "trainval.txt", "Abyssinian_1 1 1 1\n")
    _img(base / "images" / "Abyssinian_1.jpg")


def _stanford_cars(base: Path) -> None:
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(["Acura RL Sedan 2012"], dtype=object)})
    annos = np.array([("00001.jpg", 1)], dtype=[("fname", object), ("class", int)])
    savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annos})
    _img(base / "cars_train" / "00001.jpg")


def _sun397(base: Path) -> None:
    _text(base / "SUN397" / "ClassName.txt", "/a/abbey\n")
    for i in range(5):
        _img(base / "SUN397" / "a" / "abbey" / f"sun_{i}.jpg", i)


def _tinyimagenet(base: Path) -> None:
    _img(base / "train" / "n01443537" / "images" / "n01443537_0.JPEG")
    _img(base / "val" / "images" / "val_0.JPEG")
    _text(base / "val" / "val_annotations.txt", "val_0.JPEG\tn01443537\t0\t0\t4\t4\n")
    _text(base / "wnids.txt", "n01443537\n")


# dataset -> (writer, where torchvision / the ZSCL code keeps it under its data root: the base folder, and the
# folder `locate` reports: the base itself, or the folder above it that the reader searches)
TORCHVISION: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "aircraft": (_aircraft, "fgvc-aircraft-2013b", "fgvc-aircraft-2013b"),
    "caltech101": (_caltech101, "caltech101", "caltech101"),
    "cifar10": (_cifar10_python, "cifar-10-batches-py", "cifar-10-batches-py"),
    "cifar100": (_cifar100_python, "cifar-100-python", "cifar-100-python"),
    "dtd": (_dtd, "dtd/dtd", "dtd"),
    "eurosat": (_eurosat, "eurosat", "eurosat"),
    "flowers": (_flowers, "flowers-102", "flowers-102"),
    "food": (_food, "food-101", "food-101"),
    "mnist": (_mnist, "MNIST/raw", "MNIST/raw"),
    "oxford_pet": (_oxford_pet, "oxford-iiit-pet", "oxford-iiit-pet"),
    "stanford_cars": (_stanford_cars, "stanford_cars", "stanford_cars"),
    "sun397": (_sun397, "", ""),  # <root>/SUN397/...: the data root itself holds it
    "tinyimagenet": (_tinyimagenet, "tiny-imagenet-200", "tiny-imagenet-200"),
}


def test_every_layout_dataset_has_a_torchvision_fixture():
    assert set(TORCHVISION) == set(layouts.LAYOUTS)
    assert {i.name for i in registry.DATASETS.values() if i.mtil} <= set(TORCHVISION)


def test_a_torchvision_data_root_is_found_and_read_for_every_dataset(tmp_path, capsys):
    for writer, base, _ in TORCHVISION.values():
        writer(tmp_path / base)
    rows = {r.info.name: r for r in registry.list_datasets(tmp_path)}
    for name, (_, _, where) in TORCHVISION.items():
        row = rows[name]
        assert (row.present, row.layout, row.location) == (True, "official", str(tmp_path / where)), name
        assert row.found is not None and Path(row.found).exists() and not row.looked_in
        if HAS_SCIPY or name not in NEEDS_SCIPY:
            assert len(readers.read_official(name, Path(row.location), "train")) >= 1, name
    assert not rows["clothing"].present and str(tmp_path / "clothing.zip") in rows["clothing"].looked_in

    assert main(["data", "list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"found (official): {tmp_path / 'cifar-100-python' / 'meta'}" in out
    assert f"found (official): {tmp_path / 'SUN397'}" in out
    assert f"not found; looked in: {tmp_path / 'clothing.zip'}, {tmp_path / 'clothing'}/" in out


# other standard folder names: archives unpacked in the data root, the official CIL code's (continuum) layout
OTHER_NAMES = [
    ("caltech101", _caltech101, "caltech-101", "caltech-101"),  # data.caltech.edu's caltech-101.zip
    ("caltech101", _caltech101, "", ""),  # 101_ObjectCategories/ directly in the root
    ("eurosat", _eurosat, "", ""),  # EuroSAT.zip unpacked in the root: 2750/
    ("eurosat", _eurosat, "EuroSAT", "EuroSAT"),
    ("flowers", _flowers, "flowers102", "flowers102"),
    ("cifar10", _cifar10_binary, "cifar-10-batches-bin", "cifar-10-batches-bin"),
    ("cifar100", _cifar100_binary, "cifar-100-binary", "cifar-100-binary"),
    ("cifar100", _cifar100_python, "cifar100/cifar-100-python", "cifar100"),  # continuum
    ("tinyimagenet", _tinyimagenet, "tinyimagenet/tiny-imagenet-200", "tinyimagenet"),  # continuum
    ("aircraft", _aircraft, "aircraft/fgvc-aircraft-2013b", "aircraft"),  # `moecl data download`
    ("mnist", _mnist, "mnist", "mnist"),
]


@pytest.mark.parametrize(("name", "writer", "base", "where"), OTHER_NAMES)
def test_other_standard_folder_names_are_found(tmp_path, name, writer, base, where):
    writer(tmp_path / base)
    assert registry.locate(name, tmp_path) == ("official", tmp_path / where)
    if HAS_SCIPY or name not in NEEDS_SCIPY:
        assert len(readers.read_official(name, tmp_path / where, "train")) >= 1
    others = [n for n in layouts.LAYOUTS if n != name and registry.locate(n, tmp_path) is not None]
    assert not others  # one dataset's folder is not mistaken for another's


def test_official_layout_wins_over_an_image_folder_guess_and_missing_message_lists_places(tmp_path):
    _tinyimagenet(tmp_path / "tinyimagenet")  # val/images/*.JPEG would read as an ImageFolder class "images"
    assert registry.locate("tinyimagenet", tmp_path) == ("official", tmp_path / "tinyimagenet")
    with pytest.raises(DataError, match="caltech-101/"):
        registry.open_split("caltech101", tmp_path, "train")


def test_readme_lists_every_standard_folder_name():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Data you already have", 1)[1].split("###", 1)[0]
    for name, layout in layouts.LAYOUTS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert all(f"`{folder}/`" in row for folder in layout.folders if folder), name
        assert ("directly in the root" in row) == ("" in layout.folders), name
