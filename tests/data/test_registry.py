"""Registry metadata, lookup, presence listing and open_split over the three layouts (real zips when available)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moecl.data import registry, templates
from moecl.data.folder import DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
BUNDLED = Path(__file__).resolve().parents[2] / "src" / "moecl" / "assets" / "data"
REAL_ROOT = SHARED if SHARED.is_dir() else BUNDLED
MTIL_ORDER_I = [
    "aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
    "stanford_cars", "sun397",
]  # fmt: skip


def test_every_entry_is_well_formed():
    assert [n for n, i in registry.DATASETS.items() if i.mtil] == MTIL_ORDER_I
    for name, info in registry.DATASETS.items():
        assert info.name == name == name.lower()
        assert info.splits, name
        if info.auto_download:
            assert info.files and all(f.urls for f in info.files), name
        else:
            assert info.notes or info.official_layout, name  # says what to do instead
        for f in info.files:
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), (name, f.filename)
            assert f.md5 is None or re.fullmatch(r"[0-9a-f]{32}", f.md5), (name, f.filename)
            assert all(u.startswith(("https://", "http://")) for u in f.urls), (name, f.filename)
        if info.templates_key and name != "folder":
            assert templates.templates_for(info.templates_key), name


def _counts(prose: str) -> set[int]:
    """Image counts a split's prose states: numbers with thousands separators, or of 3+ digits."""
    return {int(m.replace(",", "")) for m in re.findall(r"(?<![\w,])(\d{1,3}(?:,\d{3})+|\d{3,})(?![\w,])", prose)}


def test_split_sizes_agree_with_the_prose():
    """Every recorded size is stated in its split's prose, and the prose states no other count (besides, for the
    seeded 80/20 splits, the dataset's total); the MTIL / CIL datasets all have train and test sizes."""
    for name, info in registry.DATASETS.items():
        assert set(info.split_sizes) <= set(info.splits), name
        total = sum(info.split_sizes.get(s, 0) for s in ("train", "test"))
        for split, prose in info.splits.items():
            stated = _counts(prose)
            if split in info.split_sizes:
                assert info.split_sizes[split] in stated, (name, split, prose)
                assert stated <= {info.split_sizes[split], total}, (name, split, prose)
            else:
                assert not stated, (name, split, prose)  # a count in the prose belongs in split_sizes too
        if info.mtil or name in ("cifar10", "tinyimagenet"):
            assert {"train", "test"} <= set(info.split_sizes), name
    assert registry.DATASETS["caltech101"].split_sizes == {"train": 6_941, "test": 1_736}  # int(0.8 n), the rest
    assert registry.DATASETS["sun397"].split_sizes == {"train": 87_003, "test": 21_751}
    # protocol facts from method.md §5
    assert registry.get_dataset("aircraft").num_classes == 100
    assert "train1" in registry.get_dataset("dtd").splits["train"]
    assert "1,020" in registry.get_dataset("flowers").splits["train"]
    assert "trainval" in registry.get_dataset("oxford_pet").splits["train"]
    for name in ("caltech101", "eurosat", "sun397"):
        assert "seed 42" in registry.get_dataset(name).splits["train"]
    assert not registry.get_dataset("stanford_cars").auto_download


def test_get_dataset_aliases_and_did_you_mean():
    assert registry.get_dataset("OxfordPet").name == "oxford_pet"
    assert registry.get_dataset("Flowers102").name == "flowers"
    assert registry.get_dataset("SUN397").name == "sun397"
    with pytest.raises(DataError, match="did you mean 'caltech101'"):
        registry.get_dataset("caltec101")
    with pytest.raises(DataError, match="known: aircraft"):
        registry.get_dataset("nothing-like-it")


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, 0, 0)).save(path)


def _zip(path: Path, layout: dict[str, dict[str, int]]) -> Path:
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for split, classes in layout.items():
            for cls, n in classes.items():
                for i in range(n):
                    buf = io.BytesIO()
                    Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, "PNG")
                    z.writestr(f"{split}/{cls}/{i}.png", buf.getvalue())
    return path


def test_list_datasets_reports_presence_and_layout(tmp_path):
    _zip(tmp_path / "clothing.zip", {"train": {"hat": 1}})
    for cls in ("dress", "hat"):
        _png(tmp_path / "imagenet" / "val" / cls / "0.png")
    (tmp_path / "dtd" / "dtd" / "labels").mkdir(parents=True)
    rows = {r.info.name: r for r in registry.list_datasets(tmp_path)}
    assert set(rows) == set(registry.DATASETS)
    assert (rows["clothing"].present, rows["clothing"].layout) == (True, "zip")
    assert (rows["imagenet"].present, rows["imagenet"].layout) == (True, "folder")
    assert (rows["dtd"].present, rows["dtd"].layout) == (True, "official")
    assert not rows["mnist"].present and rows["mnist"].location is None
    as_json = json.loads(json.dumps([r.to_dict() for r in rows.values()]))
    assert {"name", "present", "location", "splits", "auto_download", "hf_mirror"} <= set(as_json[0])
    assert not any(r.present for r in registry.list_datasets(None))


def test_open_split_zip_then_folder_with_protocol_class_names(tmp_path):
    _zip(tmp_path / "cifar10.zip", {"test": {n: 2 for n in templates.CLASSNAMES["cifar10"]}})
    ds = registry.open_split("cifar10", tmp_path, "test")
    assert ds.name == "cifar10" and len(ds) == 20 and ds.classnames == templates.CLASSNAMES["cifar10"]
    for d in range(10):
        _png(tmp_path / "mnist" / "train" / str(d) / "a.png", d)
    ds = registry.open_split("mnist", tmp_path, "train")
    assert ds.classnames[3] == "3 - three" and ds.labels == list(range(10))
    with pytest.raises(DataError, match="splits present: train"):
        registry.open_split("mnist", tmp_path, "validation")


def test_open_split_official_layout(tmp_path):
    base = tmp_path / "eurosat" / "2750"
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
               "Residential", "River", "SeaLake"]  # fmt: skip
    for label, cls in enumerate(folders):
        for i in range(5):
            _png(base / cls / f"{cls}_{i}.jpg", label)
    train = registry.open_split("eurosat", tmp_path, "train")
    test = registry.open_split("eurosat", tmp_path, "test")
    assert (len(train), len(test)) == (40, 10)
    assert train.classnames == templates.CLASSNAMES["eurosat"]  # hand-written prompt names, official index
    assert train.classnames[0] == "annual crop land"


def test_open_split_class_count_mismatch_is_a_clear_error(tmp_path):
    for cls in ("ant", "not_a_caltech_class"):
        _png(tmp_path / "caltech101" / "101_ObjectCategories" / cls / "image_0001.jpg")
    with pytest.raises(DataError, match="2 class folders but the protocol's class-name list has 101"):
        registry.open_split("caltech101", tmp_path, "all")


def test_open_split_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        registry.open_split("food", tmp_path, "train")
    message = str(info.value)
    assert str(tmp_path / "food.zip") in message and f"moecl data download food --root {tmp_path}" in message
    with pytest.raises(DataError, match="Kaggle"):
        registry.open_split("stanford_cars", tmp_path, "train")


def test_open_split_generic_folder_or_zip(tmp_path):
    z = _zip(tmp_path / "mine.zip", {"train": {"red_panda": 2, "cat": 1}})
    ds = registry.open_split("folder", z, "train")
    assert ds.classnames == ("cat", "red_panda") and ds.labels == [0, 1, 1]
    with pytest.raises(DataError, match="neither a folder nor a .zip"):
        registry.open_split("folder", tmp_path / "absent", "train")


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason="no offline dataset copies (../shared/data or bundled subset)")
@pytest.mark.parametrize(
    ("name", "split", "first_name"),
    [
        ("caltech101", "test", "off-center face"),
        ("mnist", "test", "0 - zero"),
        ("cifar10", "train", "airplane"),
        ("clothing", "train", None),
        ("imagenet_sample", "test", "tench"),
    ],
)
def test_open_split_on_the_real_offline_zips(name, split, first_name):
    if not (REAL_ROOT / f"{name}.zip").is_file():
        pytest.skip(f"{name}.zip not in {REAL_ROOT}")
    ds = registry.open_split(name, REAL_ROOT, split)
    info = registry.get_dataset(name)
    assert len(ds.classnames) == info.num_classes or REAL_ROOT == BUNDLED
    assert len(ds) > 0 and min(ds.class_counts()) > 0
    if first_name and len(ds.classnames) == info.num_classes:
        assert ds.classnames[0] == first_name
    manifest = json.loads((REAL_ROOT / "MANIFEST.json").read_text())
    entry = manifest.get("datasets", manifest).get(name, {})
    expected = entry.get("splits", {}).get(split)
    if expected is not None:
        assert len(ds) == expected
    # decode a few real images (spread over the split)
    for i in np.linspace(0, len(ds) - 1, 4).astype(int):
        image, label = ds[int(i)]
        assert image.mode == "RGB" and 0 <= label < len(ds.classnames)
