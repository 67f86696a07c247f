"""The one image-dataset type every reader returns, its image sources, and ImageFolder / zip readers.

An `ImageDataset` is a list of (source, label) pairs: a source knows a stable unique `key` (used for caching,
seeding and error messages) and how to `open()` its image as RGB. Images are decoded lazily, one at a time, so a
60,000-image split costs a list of small objects, not pixels.
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch.utils.data
from PIL import Image

# The extensions torchvision's ImageFolder accepts (lower-case compare).
# What training and `moecl predict DIR` both read as images (is_image_name): every format PIL decodes that datasets use.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ON_BAD_IMAGE = ("error", "skip")


class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message says which file and what to do."""


class BadImageError(DataError):
    """An image cannot be decoded; the message names the file (archive + member) and how to skip such images."""


class ImageSource(Protocol):
    """Where one image comes from: `key` is a stable unique id, `open()` decodes it as an RGB PIL image."""

    @property
    def key(self) -> str: ...

    def open(self) -> Image.Image: ...


def _to_rgb(img: Image.Image) -> Image.Image:
    img.load()  # decode now, so truncated files fail here and not later inside a transform
    return img if img.mode == "RGB" else img.convert("RGB")


class FileSource:
    """An image file on disk."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))

    @property
    def key(self) -> str:
        return self.path

    def open(self) -> Image.Image:
        with Image.open(self.path) as img:
            return _to_rgb(img)

    def __repr__(self) -> str:
        return f"FileSource({self.path!r})"


class ZipArchive:
    """One zip file, opened lazily once per process and shared by all its members' sources.

    The handle is reopened after a fork (DataLoader workers) and dropped when pickled (spawn workers), because a
    ZipFile's file position must not be shared between processes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def handle(self) -> zipfile.ZipFile:
        with self._lock:
            if self._zip is None or self._pid != os.getpid():
                self._zip = zipfile.ZipFile(self.path)
                self._pid = os.getpid()
            return self._zip

    def read(self, member: str) -> bytes:
        return self.handle().read(member)

    def namelist(self) -> list[str]:
        return self.handle().namelist()

    def close(self) -> None:
        with self._lock:
            if self._zip is not None and self._pid == os.getpid():
                self._zip.close()
            self._zip = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"ZipArchive({self.path!r})"


class ZipSource:
    """One member of a zip archive. Pass a shared `ZipArchive` (or a path, which makes a private one)."""

    __slots__ = ("archive", "member")

    def __init__(self, zip_path: str | os.PathLike | ZipArchive, member: str):
        self.archive = zip_path if isinstance(zip_path, ZipArchive) else ZipArchive(zip_path)
        self.member = member

    @property
    def key(self) -> str:
        return f"{self.archive.path}::{self.member}"

    def open(self) -> Image.Image:
        with Image.open(io.BytesIO(self.archive.read(self.member))) as img:
            return _to_rgb(img)

    def __repr__(self) -> str:
        return f"ZipSource({self.archive.path!r}, {self.member!r})"


class ArraySource:
    """Image `index` of an array provider (CIFAR / MNIST binaries): `provider[index]` (or `provider(index)` when
    it is callable) returns a uint8 array of shape (H, W) or (H, W, 3)."""

    __slots__ = ("provider", "index", "_key")

    def __init__(self, provider: Any, index: int, key: str):
        self.provider = provider
        self.index = int(index)
        self._key = key

    @property
    def key(self) -> str:
        return self._key

    def open(self) -> Image.Image:
        array = self.provider(self.index) if callable(self.provider) else self.provider[self.index]
        return _to_rgb(Image.fromarray(array))

    def __repr__(self) -> str:
        return f"ArraySource(index={self.index}, key={self._key!r})"


Item = tuple[ImageSource, int]


class ImageDataset(torch.utils.data.Dataset):
    """`ds[i] -> (RGB PIL image, label)`; with on_bad_image="skip" an unreadable image gives (None, label) and is
    counted in `skipped` (per process: DataLoader workers count their own)."""

    def __init__(
        self,
        name: str,
        split: str,
        classnames: Sequence[str],
        items: Sequence[Item],
        on_bad_image: str = "error",
        drawn_from: int | None = None,
    ):
        if on_bad_image not in ON_BAD_IMAGE:
            raise DataError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.name = name
        self.split = split
        self.classnames = tuple(classnames)
        self.items: list[Item] = list(items)
        self.on_bad_image = on_bad_image
        self.skipped = 0
        n = len(self.classnames)
        for source, label in self.items:
            if not 0 <= label < n:
                raise DataError(f"{name}/{split}: label {label} of {source.key} is outside 0..{n - 1}")
        self._labels = [int(label) for _, label in self.items]  # computed once: the engine reads it per batch
        # images of the split this one was drawn from by `subset` (k-shot, per-class limits): a DDAS autoencoder's
        # learning-rate epoch is one pass over that whole split (selector/autoencoder.py)
        self.drawn_from = len(self.items) if drawn_from is None else int(drawn_from)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        source, label = self.items[i]
        try:
            return source.open(), label
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, zlib errors... for bad files
            if self.on_bad_image == "skip":
                self.skipped += 1
                return None, label
            raise BadImageError(
                f"cannot read image {source.key} ({self.name}/{self.split}, class "
                f"{self.classnames[label]!r}): {type(exc).__name__}: {exc}. Replace or delete the file, or set "
                f"`stream.on_bad_image: skip` in the config to skip unreadable images"
            ) from exc

    def key(self, i: int) -> str:
        return self.items[i][0].key

    @property
    def labels(self) -> list[int]:
        """Label of every image, in order (shared list: do not modify)."""
        return self._labels

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classnames)
        for label in self._labels:
            counts[label] += 1
        return counts

    def subset(self, indices: Iterable[int]) -> ImageDataset:
        return self._with(items=[self.items[i] for i in indices], drawn_from=self.drawn_from)

    def with_classnames(self, classnames: Sequence[str]) -> ImageDataset:
        """Same images, readable class names (same count and order as the current ones)."""
        if len(classnames) != len(self.classnames):
            raise DataError(
                f"{self.name}/{self.split}: {len(classnames)} class names given for {len(self.classnames)} classes"
            )
        return self._with(classnames=tuple(classnames))

    def relabel(self, classes: Sequence[int], classnames: Sequence[str] | None = None) -> ImageDataset:
        """Only the images of `classes` (old label ids), labelled 0..len(classes)-1 in that order (CIL steps)."""
        new = {old: new for new, old in enumerate(classes)}
        items = [(source, new[label]) for source, label in self.items if label in new]
        names = tuple(classnames) if classnames is not None else tuple(self.classnames[c] for c in classes)
        return self._with(items=items, classnames=names)

    def _with(self, **changes: Any) -> ImageDataset:
        args = dict(
            name=self.name, split=self.split, classnames=self.classnames, items=self.items,
            on_bad_image=self.on_bad_image,
        )
        if "items" not in changes:  # the same images (new class names): drawn from the same split
            args["drawn_from"] = self.drawn_from
        args.update(changes)
        return ImageDataset(**args)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, {self.split!r}, {len(self.classnames)} classes, {len(self)} images)"


# ----------------------------------------------------------------------------------------------------------------
# <split>/<class>/<file> readers
# ----------------------------------------------------------------------------------------------------------------
def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _missing_split(where: str, split: str, present: Iterable[str]) -> DataError:
    present = sorted(present)
    listed = ", ".join(present) if present else "none"
    return DataError(
        f"{where}: no split '{split}' (splits present: {listed}); expected the layout <split>/<class>/<image>"
    )


def _build(
    name: str,
    split: str,
    folders: list[str],
    files: dict[str, list[Any]],
    make: Callable[[Any], ImageSource],
    on_bad_image: str,
) -> ImageDataset:
    items = [(make(f), label) for label, folder in enumerate(folders) for f in sorted(files[folder])]
    return ImageDataset(name, split, folders, items, on_bad_image)


def read_image_folder(
    path: str | os.PathLike, split: str, name: str | None = None, on_bad_image: str = "error"
) -> ImageDataset:
    """Images under <path>/<split>/<class>/, classes in sorted() order (torchvision ImageFolder); class names are
    the folder names (rename with `with_classnames`). Empty class folders stay in the class list (so labels keep
    their meaning) and are reported by `validate_stream`."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    base = root / split
    if not base.is_dir():
        raise _missing_split(str(root), split, (p.name for p in root.iterdir() if p.is_dir()))
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{base}: no class folders; expected the layout <split>/<class>/<image>")
    files = {
        c: [str(p) for p in (base / c).rglob("*") if p.is_file() and is_image_name(p.name)] for c in folders
    }
    return _build(name or root.name, split, folders, files, FileSource, on_bad_image)


def zip_splits(path: str | os.PathLike) -> list[str]:
    """Split folders of a <split>/<class>/<file> zip."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return _zip_split_names(names, _zip_root(names))


def read_image_zip(
    path: str | os.PathLike, split: str, name: str | None = None, on_bad_image: str = "error"
) -> ImageDataset:
    """Images stored as <split>/<class>/<file> members of a zip (an optional single top folder is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: zip file not found")
    try:
        archive = ZipArchive(path)
        names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not a valid zip file ({exc}); download it again") from exc
    prefix = _zip_root(names)
    depth = prefix.count("/")
    folders: set[str] = set()
    files: dict[str, list[str]] = {}
    for member in names:
        if not member.startswith(prefix + split + "/"):
            continue
        parts = member.split("/")[depth:]
        if len(parts) < 3 or parts[1].startswith("."):  # split/class/ entries, files directly under the split
            continue
        folders.add(parts[1])
        if is_image_name(member):
            files.setdefault(parts[1], []).append(member)
    if not folders:
        raise _missing_split(str(path), split, _zip_split_names(names, prefix))
    ordered = sorted(folders)
    files = {c: files.get(c, []) for c in ordered}
    return _build(name or path.stem, split, ordered, files, lambda m: ZipSource(archive, m), on_bad_image)


def _zip_root(names: list[str]) -> str:
    """'' when <split>/<class>/<file> sits at the top of the archive, 'top/' when it all sits in one folder."""
    image_depths = {n.count("/") for n in names if is_image_name(n)}
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    if 2 not in image_depths and len(tops) == 1 and image_depths and min(image_depths) >= 3:
        return next(iter(tops)) + "/"
    return ""


def _zip_split_names(names: list[str], prefix: str) -> list[str]:
    rel = [n[len(prefix) :] for n in names if n.startswith(prefix)]
    return sorted({r.split("/", 1)[0] for r in rel if r.count("/") >= 2})


def open_folder_or_zip(
    path: str | os.PathLike, split: str, name: str | None = None, on_bad_image: str = "error"
) -> ImageDataset:
    """A directory or a .zip in the <split>/<class>/<file> layout."""
    path = Path(path)
    if path.is_dir():
        return read_image_folder(path, split, name, on_bad_image)
    if path.is_file() and zipfile.is_zipfile(path):
        return read_image_zip(path, split, name, on_bad_image)
    if path.exists():
        raise DataError(f"{path}: neither a folder nor a zip file; expected <split>/<class>/<image>")
    raise DataError(f"{path}: not found (expected a folder or a .zip laid out as <split>/<class>/<image>)")


def list_splits(path: str | os.PathLike) -> list[str]:
    """Split names of a folder or zip in the <split>/<class>/<file> layout."""
    path = Path(path)
    if path.is_dir():
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return zip_splits(path)
