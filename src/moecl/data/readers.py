"""Readers for the official archive layouts of the MTIL / CIL datasets, one function per dataset.

Each `read_<name>(root, split, on_bad_image="error") -> ImageDataset` takes the dataset folder (`<data root>/<name>`,
which may hold the official top folder, e.g. `fgvc-aircraft-2013b/`, or be that folder itself) and returns the split
with labels in the dataset's standard class index and the dataset's own (raw) class names; `registry.open_split`
swaps in the prompt class names from data/templates.py.

Split choices (method.md §5, and the paper's code where the text is silent):
- Aircraft: variant level (100 classes); MTIL trains on the official `train` list (not trainval) and tests on `test`.
- Caltech101 (BACKGROUND_Google excluded), EuroSAT, SUN397: the official seed-42 80/20 `torch.utils.data.random_split`
  over torchvision's listing of the dataset, image for image (splits.py says how and cites the source); SUN397's
  listing is the filesystem's directory order, as in the official code.
- DTD partition 1; Flowers102 official train (1,020); OxfordPet trainval/test; others official train/test.
CIFAR is read from the official binary version with numpy or from the python version with a restricted unpickler
that admits only numpy arrays and plain values (cifar_pickle.py); MNIST from idx files with numpy.
"""

from __future__ import annotations

import gzip
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moecl.data import cifar_pickle, layouts, splits
from moecl.data.folder import (
    ArraySource,
    DataError,
    FileSource,
    ImageDataset,
    is_image_name,
)

Items = list[tuple[Any, int]]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise DataError(f"{name}: no split '{split}' (splits: {', '.join(allowed)})")


def _require(root: Path, name: str) -> Path:
    """The folder of `root` that holds dataset `name`'s official layout (layouts.LAYOUTS), or a clear error."""
    base = layouts.find_base(name, Path(root))
    if base is None:
        raise DataError(
            f"{name}: {root} does not hold the official layout ({layouts.describe(name, Path(root))}); run "
            f"`moecl data download {name} --root {Path(root).parent}` or unpack the official archive there"
        )
    return base


def _read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _dataset(name: str, split: str, classnames: Sequence[str], items: Items, on_bad_image: str) -> ImageDataset:
    if not items:
        raise DataError(f"{name}/{split}: no images found")
    return ImageDataset(name, split, classnames, items, on_bad_image)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))


def _loadmat(path: Path, dataset: str, mirror: str | None) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError:
        alt = f", or install `datasets` and use the Hugging Face mirror {mirror}" if mirror else ""
        raise DataError(f"{dataset}: reading {path.name} (MATLAB .mat) needs scipy: pip install scipy{alt}") from None
    try:
        return loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises several types for corrupt files
        raise DataError(f"{dataset}: cannot read {path}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# array-backed formats (CIFAR binary, MNIST idx): decoded once per process, lazily
# ----------------------------------------------------------------------------------------------------------------
class LazyArray:
    """A uint8 image array loaded on first use by `loader()` (then cached); picklable without its data."""

    def __init__(self, loader: Callable[[], np.ndarray], label: str):
        self.loader = loader
        self.label = label
        self._data: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> np.ndarray:
        if self._data is None:
            with self._lock:
                if self._data is None:
                    self._data = self.loader()
        return self._data[index]

    def __getstate__(self) -> dict[str, Any]:
        return {"loader": self.loader, "label": self.label}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["loader"], state["label"])


def _cifar_records(paths: Sequence[Path], label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of the CIFAR binary format: label byte(s) then 3072 bytes (R, G, B planes of 32x32)."""
    record = label_bytes + 3072
    chunks = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size % record:
            raise DataError(
                f"{path}: size {raw.size} is not a multiple of the {record}-byte CIFAR record; the file "
                f"is truncated or not the binary version"
            )
        chunks.append(raw.reshape(-1, record))
    data = np.concatenate(chunks)
    return data[:, :label_bytes], data[:, label_bytes:]


class _CifarImages:
    """Picklable loader: HWC uint8 images of CIFAR binary files."""

    def __init__(self, paths: Sequence[Path], label_bytes: int):
        self.paths, self.label_bytes = [str(p) for p in paths], label_bytes

    def __call__(self) -> np.ndarray:
        _, pixels = _cifar_records([Path(p) for p in self.paths], self.label_bytes)
        return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


class _CifarPickleImages:
    """Picklable loader: HWC uint8 images of CIFAR python files (restricted unpickling, cifar_pickle.py)."""

    def __init__(self, paths: Sequence[Path], label_key: str):
        self.paths, self.label_key = [str(p) for p in paths], label_key

    def __call__(self) -> np.ndarray:
        return cifar_pickle.read_batches([Path(p) for p in self.paths], self.label_key)[1]


def _cifar_dataset(
    name: str,
    base: Path,
    split: str,
    labels: np.ndarray,
    loader: Callable[[], np.ndarray],
    classnames: list[str],
    on_bad_image: str,
) -> ImageDataset:
    if labels.size and labels.max() >= len(classnames):
        raise DataError(f"{name}: label {labels.max()} in {base} but only {len(classnames)} class names")
    images = LazyArray(loader, f"{name}/{split}")
    items = [(ArraySource(images, i, f"{base}/{split}#{i}"), int(y)) for i, y in enumerate(labels)]
    return _dataset(name, split, classnames, items, on_bad_image)


def _existing(name: str, base: Path, files: Sequence[str]) -> list[Path]:
    paths = [base / f for f in files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{name}: missing {p}; the official archive contains it")
    return paths


def _read_cifar(
    name: str, base: Path, split: str, classnames: list[str], on_bad_image: str, files: Sequence[str], label_key: str
) -> ImageDataset:
    """CIFAR in either official version: binary records (`files` *.bin, label byte(s) first) or python pickles."""
    paths = _existing(name, base, files)
    if paths[0].suffix == ".bin":
        label_bytes = 1 if name == "cifar10" else 2  # CIFAR-100: coarse then fine label byte
        records, _ = _cifar_records(paths, label_bytes)
        labels, loader = records[:, -1].astype(np.int64), _CifarImages(paths, label_bytes)
    else:
        labels, _ = cifar_pickle.read_batches(paths, label_key)
        loader = _CifarPickleImages(paths, label_key)
    return _cifar_dataset(name, base, split, labels, loader, classnames, on_bad_image)


def read_cifar10(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    """The binary version (cifar-10-batches-bin) or the python one (cifar-10-batches-py, torchvision's)."""
    _check_split("cifar10", split, ("train", "test"))
    base = _require(root, "cifar10")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if (base / "batches.meta.txt").is_file():
        names = _read_lines(base / "batches.meta.txt")
        files = [f"{f}.bin" for f in files]
    else:
        names = cifar_pickle.label_names(base / "batches.meta", "label_names")
    return _read_cifar("cifar10", base, split, names, on_bad_image, files, "labels")


def read_cifar100(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    """The binary version (cifar-100-binary) or the python one (cifar-100-python, torchvision's); fine labels."""
    _check_split("cifar100", split, ("train", "test"))
    base = _require(root, "cifar100")
    if (base / "fine_label_names.txt").is_file():
        names, files = _read_lines(base / "fine_label_names.txt"), [f"{split}.bin"]
    else:
        names, files = cifar_pickle.label_names(base / "meta", "fine_label_names"), [split]
    return _read_cifar("cifar100", base, split, names, on_bad_image, files, "fine_labels")


def read_idx(path: Path) -> np.ndarray:
    """An idx (MNIST) file, plain or .gz, as a numpy array."""
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise DataError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(dtypes[data[2]])
    count = int(np.prod(dims)) if ndim else 1
    offset = 4 + 4 * ndim
    if len(data) - offset < count * dtype.itemsize:
        raise DataError(f"{path}: truncated ({len(data) - offset} data bytes, expected {count * dtype.itemsize})")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)


def _idx_file(base: Path, stem: str) -> Path:
    for candidate in (base / stem, base / f"{stem}.gz", base / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    raise DataError(f"mnist: missing {base / stem}[.gz]; run `moecl data download mnist --root {base.parent}`")


class _IdxImages:
    def __init__(self, path: Path):
        self.path = str(path)

    def __call__(self) -> np.ndarray:
        return read_idx(Path(self.path))


def read_mnist(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    _check_split("mnist", split, ("train", "test"))
    root = Path(root)
    base = layouts.find_base("mnist", root) or root
    prefix = "train" if split == "train" else "t10k"
    image_path = _idx_file(base, f"{prefix}-images-idx3-ubyte")
    labels = read_idx(_idx_file(base, f"{prefix}-labels-idx1-ubyte")).astype(int)
    images = LazyArray(_IdxImages(image_path), f"mnist/{split}")
    items = [(ArraySource(images, i, f"{image_path}#{i}"), int(y)) for i, y in enumerate(labels)]
    return _dataset("mnist", split, [str(d) for d in range(10)], items, on_bad_image)


# ----------------------------------------------------------------------------------------------------------------
# image-file formats
# ----------------------------------------------------------------------------------------------------------------
def read_aircraft(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    _check_split("aircraft", split, ("train", "val", "trainval", "test"))
    base = _require(root, "aircraft")
    data = base / "data"
    classes = _read_lines(data / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}
    items: Items = []
    for line in _read_lines(data / f"images_variant_{split}.txt"):
        image_id, variant = line.split(" ", 1)
        if variant not in index:
            raise DataError(f"aircraft: variant {variant!r} of image {image_id} is not in {data / 'variants.txt'}")
        items.append((FileSource(data / "images" / f"{image_id}.jpg"), index[variant]))
    return _dataset("aircraft", split, classes, items, on_bad_image)


def read_caltech101(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    base = _require(root, "caltech101")
    classes, listing = splits.caltech101_listing(base / "101_ObjectCategories")
    return _official_split("caltech101", classes, listing, split, on_bad_image)


def _official_split(
    name: str, classes: Sequence[str], listing: Sequence[tuple[Path, int]], split: str, on_bad_image: str
) -> ImageDataset:
    """The official random split (splits.py) of a dataset listed in torchvision's order, in the split's order."""
    chosen = splits.official_split(len(listing), split)
    items: Items = [(FileSource(listing[i][0]), listing[i][1]) for i in chosen]
    return _dataset(name, split, classes, items, on_bad_image)


def read_dtd(root: Path, split: str, on_bad_image: str = "error", partition: int = 1) -> ImageDataset:
    _check_split("dtd", split, ("train", "val", "test"))
    base = _require(root, "dtd")
    if not (base / "images").is_dir():
        raise DataError(f"dtd: {base / 'images'} is missing")
    classes = sorted(p.name for p in (base / "images").iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    items: Items = []
    for line in _read_lines(base / "labels" / f"{split}{partition}.txt"):
        rel = line.strip()
        cls = rel.split("/", 1)[0]
        if cls not in index:
            raise DataError(f"dtd: class folder {cls!r} of {rel} is missing in {base / 'images'}")
        items.append((FileSource(base / "images" / rel), index[cls]))
    return _dataset("dtd", split, classes, items, on_bad_image)


def read_eurosat(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    base = _require(root, "eurosat")
    classes, listing = splits.image_folder_listing(base / "2750")
    return _official_split("eurosat", classes, listing, split, on_bad_image)


def read_flowers(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    _check_split("flowers", split, ("train", "val", "test"))
    base = _require(root, "flowers")
    labels = np.asarray(_loadmat(base / "imagelabels.mat", "flowers", "dpdl-benchmark/oxford_flowers102")["labels"])
    setid = _loadmat(base / "setid.mat", "flowers", "dpdl-benchmark/oxford_flowers102")
    ids = np.atleast_1d(np.asarray(setid[{"train": "trnid", "val": "valid", "test": "tstid"}[split]])).astype(int)
    labels = np.atleast_1d(labels).astype(int)
    num_classes = int(labels.max())
    items = [(FileSource(base / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1]) - 1) for i in ids]
    return _dataset("flowers", split, [str(c) for c in range(1, num_classes + 1)], items, on_bad_image)


def read_food(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    _check_split("food", split, ("train", "test"))
    base = _require(root, "food")
    classes = _read_lines(base / "meta" / "classes.txt")
    index = {c: i for i, c in enumerate(classes)}
    items: Items = []
    for line in _read_lines(base / "meta" / f"{split}.txt"):
        rel = line.strip()
        cls = rel.split("/", 1)[0]
        if cls not in index:
            raise DataError(f"food: class {cls!r} of {rel} is not in {base / 'meta' / 'classes.txt'}")
        items.append((FileSource(base / "images" / f"{rel}.jpg"), index[cls]))
    return _dataset("food", split, classes, items, on_bad_image)


def read_oxford_pet(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    _check_split("oxford_pet", split, ("train", "trainval", "test"))
    base = _require(root, "oxford_pet")
    wanted = "test" if split == "test" else "trainval"
    names: dict[int, str] = {}
    rows: list[tuple[str, int]] = []
    for which in ("trainval", "test"):  # both lists name classes; only `wanted` gives the images
        path = base / "annotations" / f"{which}.txt"
        if which != wanted and not path.is_file():
            continue
        for line in _read_lines(path):
            if line.startswith("#"):
                continue
            image_id, class_id = line.split()[:2]
            label = int(class_id) - 1
            # torchvision's class names: "american_bulldog" -> "American Bulldog" (what the paper's prompts used)
            names.setdefault(label, " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_")))
            if which == wanted:
                rows.append((image_id, label))
    classes = [names.get(i, str(i + 1)) for i in range(max(names) + 1)]
    items = [(FileSource(base / "images" / f"{image_id}.jpg"), label) for image_id, label in rows]
    return _dataset("oxford_pet", split, classes, items, on_bad_image)


def read_stanford_cars(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    _check_split("stanford_cars", split, ("train", "test"))
    base = _require(root, "stanford_cars")
    mirror = "tanganke/stanford_cars"
    classes = [
        str(c)
        for c in np.atleast_1d(_loadmat(base / "devkit" / "cars_meta.mat", "stanford_cars", mirror)["class_names"])
    ]
    if split == "train":
        annos, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        annos, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
    if not annos.is_file():
        raise DataError(f"stanford_cars: missing {annos}; see `moecl data list` for where to get it")
    records = np.atleast_1d(_loadmat(annos, "stanford_cars", mirror)["annotations"])
    items = [(FileSource(images / str(r["fname"])), int(r["class"]) - 1) for r in records]
    return _dataset("stanford_cars", split, classes, items, on_bad_image)


def read_sun397(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    base = _require(root, "sun397")
    data = base / "SUN397"
    files = [(path, "/".join(path.relative_to(data).parts[1:-1])) for path in splits.rglob_order(data, "sun_*.jpg")]
    class_file = data / "ClassName.txt"
    if class_file.is_file():  # "/a/abbey", "/a/apartment_building/outdoor" -> "abbey", "apartment_building/outdoor"
        classes = [line[3:].strip() for line in _read_lines(class_file)]
    else:
        classes = sorted({cls for _, cls in files if cls})
    index = {c: i for i, c in enumerate(classes)}
    # files outside the 397 category folders are ignored (torchvision's SUN397 would stop on them)
    listing = [(path, index[cls]) for path, cls in files if cls in index]
    return _official_split("sun397", classes, listing, split, on_bad_image)


def read_tinyimagenet(root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    """Train = train/<wnid>/images; test (alias val) = the labelled val set. Class names are the wnids (templates.py
    turns them into words, the same as for an ImageFolder copy of the dataset).

    Label = position in the sorted wnids (what an ImageFolder copy gives), not the wnids.txt order of the official
    CIL code; templates.cil_class_order maps the official class order onto this index.
    """
    _check_split("tinyimagenet", split, ("train", "val", "test"))
    base = _require(root, "tinyimagenet")
    if (base / "train").is_dir():
        wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    else:
        wnids = sorted(w.strip() for w in _read_lines(base / "wnids.txt"))
    index = {w: i for i, w in enumerate(wnids)}
    items: Items = []
    if split == "train":
        for wnid in sorted(wnids):
            items += [(FileSource(p), index[wnid]) for p in _image_files(base / "train" / wnid / "images")]
    else:
        for line in _read_lines(base / "val" / "val_annotations.txt"):
            fname, wnid = line.split("\t")[:2]
            if wnid not in index:
                raise DataError(f"tinyimagenet: val image {fname} has class {wnid}, which is not among the classes")
            items.append((FileSource(base / "val" / "images" / fname), index[wnid]))
        items.sort(key=lambda item: item[0].key)
    return _dataset("tinyimagenet", "test" if split == "val" else split, wnids, items, on_bad_image)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face mirrors (optional)
# ----------------------------------------------------------------------------------------------------------------
class HFSource:
    """Row `index` of a Hugging Face `datasets` split (image column decoded by `datasets`)."""

    __slots__ = ("table", "index", "column", "_key")

    def __init__(self, table: Any, index: int, column: str, key: str):
        self.table, self.index, self.column, self._key = table, index, column, key

    @property
    def key(self) -> str:
        return self._key

    def open(self) -> Any:
        image = self.table[self.index][self.column]
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")


def read_hf(
    hf_id: str,
    split: str,
    name: str | None = None,
    on_bad_image: str = "error",
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """A split of a Hugging Face dataset (needs the optional `datasets` package; its own split definitions)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"reading the Hugging Face mirror {hf_id} needs the `datasets` package (pip install datasets); or "
            f"download the official files with `moecl data download`"
        ) from None
    try:
        table = datasets.load_dataset(hf_id, split=split, cache_dir=cache_dir)
    except Exception as exc:  # network, missing split, gated repo: all surface as one clear message
        raise DataError(f"cannot load {hf_id} split '{split}' from Hugging Face: {exc}") from exc
    features = table.features
    image_column = image_column or next((c for c in ("image", "img") if c in features), None)
    label_column = label_column or next((c for c in ("label", "fine_label", "labels") if c in features), None)
    if image_column is None or label_column is None:
        raise DataError(f"{hf_id}: cannot tell the image / label columns among {list(features)}; pass them")
    names = getattr(features[label_column], "names", None)
    labels = [int(y) for y in table[label_column]]
    classnames = list(names) if names else [str(i) for i in range(max(labels) + 1)]
    items = [(HFSource(table, i, image_column, f"hf://{hf_id}/{split}#{i}"), y) for i, y in enumerate(labels)]
    return _dataset(name or hf_id, split, classnames, items, on_bad_image)


# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------
READERS: dict[str, Callable[..., ImageDataset]] = {
    "aircraft": read_aircraft,
    "caltech101": read_caltech101,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "dtd": read_dtd,
    "eurosat": read_eurosat,
    "flowers": read_flowers,
    "food": read_food,
    "mnist": read_mnist,
    "oxford_pet": read_oxford_pet,
    "stanford_cars": read_stanford_cars,
    "sun397": read_sun397,
    "tinyimagenet": read_tinyimagenet,
}

def looks_like_image_folder(root: Path) -> bool:
    """A <split>/<class>/<image> folder: some split folder holds class folders that hold image files."""
    for split in (p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for cls in (c for c in split.iterdir() if c.is_dir()):
            if any(f.is_file() and is_image_name(f.name) for f in cls.iterdir()):
                return True
    return False


def read_official(name: str, root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    reader = READERS.get(name)
    if reader is None:
        raise DataError(f"dataset '{name}' has no official-layout reader; use a <split>/<class>/<image> folder or zip")
    return reader(Path(root), split, on_bad_image=on_bad_image)
