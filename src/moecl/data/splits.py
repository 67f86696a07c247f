"""The official random train/test split of Caltech101, EuroSAT and SUN397, image for image.

Source: `ClassificationDataset.split_dataset` in mtil/src/datasets/collections.py of JiazuoYu/MoE-Adapters4CL
(the same file in Thunderbeee/ZSCL, which it forks):

    train_size = int(0.8 * len(dataset)); test_size = len(dataset) - train_size
    torch.utils.data.random_split(dataset, [train_size, test_size], generator=torch.Generator().manual_seed(42))

over torchvision's `Caltech101`, `EuroSAT` and `SUN397` (torchvision 0.16, the version its README installs).
`random_split` draws `torch.randperm(n, generator)` and gives train = perm[:train_size], test = the rest, each in
permutation order (a `Subset`, read in that order by the unshuffled test loader); `official_split` does the same.
The image lists therefore depend on the order in which torchvision lists the dataset, reproduced here:

- Caltech101 (torchvision/datasets/caltech.py): categories = sorted(os.listdir(101_ObjectCategories)) without
  BACKGROUND_Google; per category, image_0001.jpg .. image_<n>.jpg with n = len(os.listdir(category)).
- EuroSAT (torchvision/datasets/eurosat.py, an ImageFolder over 2750/): sorted class folders; per class,
  `sorted(os.walk(class_dir, followlinks=True))` then sorted file names with an image extension.
- SUN397 (torchvision/datasets/sun397.py): `list(Path("SUN397").rglob("sun_*.jpg"))`, i.e. the directory order
  of the filesystem (os.scandir), not sorted: the official split is only reproducible on the same copy of the
  files. `rglob_order` replays the rglob of Python 3.9-3.11 (the official environment is 3.9; 3.12 changed it).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import torch

from moecl.data.folder import IMAGE_EXTENSIONS, DataError

SEED = 42
TRAIN_FRACTION = 0.8
SPLITS = ("train", "test", "all")


def official_sizes(n: int, fraction: float = TRAIN_FRACTION) -> tuple[int, int]:
    """(train, test) sizes of the official split of n images: int(0.8 n) and the rest."""
    train = int(fraction * n)
    return train, n - train


def official_split(n: int, split: str, seed: int = SEED, fraction: float = TRAIN_FRACTION) -> list[int]:
    """Positions (into the torchvision listing of n images) of `split` ("train", "test" or "all"), in the order
    `torch.utils.data.random_split(..., generator=torch.Generator().manual_seed(seed))` yields them."""
    if split not in SPLITS:
        raise DataError(f"split '{split}' does not exist for this dataset (splits: {', '.join(SPLITS)})")
    if split == "all":
        return list(range(n))
    train, _ = official_sizes(n, fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:train] if split == "train" else perm[train:]


def caltech101_listing(categories_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, [(image path, label)]) in torchvision's Caltech101 order."""
    classes = sorted(
        name for name in os.listdir(categories_dir) if name != "BACKGROUND_Google" and (categories_dir / name).is_dir()
    )
    items: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        folder = categories_dir / cls
        n = len(os.listdir(folder))
        paths = [folder / f"image_{i:04d}.jpg" for i in range(1, n + 1)]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise DataError(
                f"caltech101: {folder} has {n} entries but no {missing[0]}; the official split numbers the images "
                f"of a category image_0001.jpg .. image_{n:04d}.jpg by its entry count (torchvision's Caltech101), "
                "so the folder must hold exactly those files (remove anything else)"
            )
        items += [(p, label) for p in paths]
    return classes, items


def image_folder_listing(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, [(image path, label)]) in torchvision ImageFolder's order (EuroSAT's 2750/)."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    items: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        for root, _, names in sorted(os.walk(folder / cls, followlinks=True)):
            items += [(Path(root) / n, label) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, items


def rglob_order(top: Path, pattern: str) -> list[Path]:
    """`list(Path(top).rglob(pattern))` as Python 3.9-3.11 order it: each directory's matching entries in
    os.scandir order, then its subdirectories (not symlinks) depth-first, also in os.scandir order."""
    found: list[Path] = []
    stack = [Path(top)]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as it:
            entries = list(it)
        found += [directory / e.name for e in entries if fnmatch.fnmatchcase(e.name, pattern)]
        subdirs = [directory / e.name for e in entries if e.is_dir(follow_symlinks=False)]
        stack += reversed(subdirs)  # popped first-to-last: depth-first in scandir order
    return found
