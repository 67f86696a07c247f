"""Where a dataset in an official / torchvision / ZSCL layout may sit under a data root, and how it is recognised.

One table, `LAYOUTS`: per dataset, marker paths (any one identifies the layout inside its base folder) and the
standard names of the folder that holds it: the official archive's top folder and the folder torchvision creates
under its `root` (the ZSCL / MoE-Adapters4CL code passes its data location to torchvision, and its TinyImageNet and
continuum's CIFAR-100 / TinyImageNet use `<root>/tiny-imagenet-200`, `<root>/<dataset>/cifar-100-python`, ...).
The readers take a dataset folder that is the base or holds one of those folders; `locate_official` looks under a
data root in this order: `<root>/<name>/` (what `moecl data download` leaves), `<root>/<folder>/` for each
standard folder name, then the root itself where the marker may sit directly in it ("" in `folders`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType


@dataclass(frozen=True)
class Layout:
    markers: tuple[str, ...]  # any one of these paths exists inside the base folder
    folders: tuple[str, ...]  # standard names of the folder holding it ("" = the data root itself)

    def __post_init__(self) -> None:
        if not self.markers:
            raise ValueError("a layout needs at least one marker path")


_MNIST_MARKERS = tuple(f"{p}-labels-idx1-ubyte{ext}" for p in ("train", "t10k") for ext in ("", ".gz"))

LAYOUTS: Mapping[str, Layout] = MappingProxyType(
    {
        # torchvision FGVCAircraft: <root>/fgvc-aircraft-2013b/data (also the archive's top folder)
        "aircraft": Layout(("data/variants.txt",), ("fgvc-aircraft-2013b",)),
        # torchvision Caltech101: <root>/caltech101/101_ObjectCategories; data.caltech.edu's caltech-101.zip:
        # caltech-101/101_ObjectCategories(.tar.gz); the bare archive unpacked in the root: 101_ObjectCategories/
        "caltech101": Layout(("101_ObjectCategories",), ("caltech101", "caltech-101", "")),
        # official binary and python archives (torchvision: <root>/cifar-10-batches-py)
        "cifar10": Layout(("batches.meta.txt", "batches.meta"), ("cifar-10-batches-bin", "cifar-10-batches-py")),
        # torchvision: <root>/cifar-100-python; continuum (the official CIL code): <root>/cifar100/cifar-100-python
        "cifar100": Layout(("fine_label_names.txt", "meta"), ("cifar-100-binary", "cifar-100-python")),
        # torchvision DTD: <root>/dtd/dtd/{images,labels}; the archive's top folder: dtd/
        "dtd": Layout(("labels",), ("dtd",)),
        # torchvision EuroSAT: <root>/eurosat/2750; EuroSAT.zip unpacks to 2750/
        "eurosat": Layout(("2750",), ("eurosat", "EuroSAT", "")),
        # torchvision Flowers102: <root>/flowers-102/{jpg,imagelabels.mat,setid.mat}
        "flowers": Layout(("imagelabels.mat",), ("flowers-102", "flowers102")),
        # torchvision Food101: <root>/food-101 (also the archive's top folder)
        "food": Layout(("meta/classes.txt",), ("food-101",)),
        # torchvision MNIST: <root>/MNIST/raw/*-ubyte
        "mnist": Layout(_MNIST_MARKERS, ("raw", "MNIST/raw", "MNIST")),
        # torchvision OxfordIIITPet: <root>/oxford-iiit-pet/{images,annotations}
        "oxford_pet": Layout(("annotations/trainval.txt",), ("oxford-iiit-pet",)),
        # torchvision StanfordCars: <root>/stanford_cars/{devkit,cars_train,cars_test,...}
        "stanford_cars": Layout(("devkit",), ("stanford_cars",)),
        # torchvision SUN397: <root>/SUN397 (the archive's top folder)
        "sun397": Layout(("SUN397",), ("sun397", "")),
        # ZSCL / MoE-Adapters4CL MTIL: <root>/tiny-imagenet-200; continuum: <root>/tinyimagenet/tiny-imagenet-200
        "tinyimagenet": Layout(("val/val_annotations.txt",), ("tiny-imagenet-200",)),
    }
)


def match(name: str, folder: Path) -> tuple[Path, str] | None:
    """(base folder, marker found) of dataset `name` in `folder` itself or `folder/<standard name>`, or None."""
    layout = LAYOUTS.get(name)
    if layout is None:
        return None
    folder = Path(folder)
    for base in (folder, *(folder / f for f in layout.folders if f)):
        for marker in layout.markers:
            if (base / marker).exists():
                return base, marker
    return None


def find_base(name: str, folder: Path) -> Path | None:
    """The folder holding dataset `name`'s marker: `folder` itself or `folder/<standard name>`; None if neither."""
    found = match(name, folder)
    return found[0] if found else None


def describe(name: str, folder: Path) -> str:
    """What `find_base` looks for in `folder`, for error messages."""
    layout = LAYOUTS[name]
    where = ", ".join(f"{f}/" for f in layout.folders if f)
    markers = " or ".join(layout.markers)
    return f"{markers} in {folder}" + (f" or in its {where}" if where else "")


def candidates(name: str, root: Path) -> list[Path]:
    """Dataset folders `locate_official` tries under data root `root`, in order."""
    root = Path(root)
    layout = LAYOUTS.get(name)
    folders = layout.folders if layout else ()
    found = [root / name, *(root / f for f in folders if f)]
    if "" in folders:
        found.append(root)
    return list(dict.fromkeys(found))


def locate_official(name: str, root: Path) -> Path | None:
    """The first dataset folder under `root` that holds `name` in an official / torchvision layout, or None."""
    return next((c for c in candidates(name, root) if c.is_dir() and find_base(name, c) is not None), None)
