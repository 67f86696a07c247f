"""Data fixtures: the real offline copies when present (else the bundled subset) and tiny generated ImageFolders."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
BUNDLED_DATA = REPO / "src" / "moecl" / "assets" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """../shared/data (full copies) when it exists, else the bundled subset (fresh clone)."""
    return SHARED_DATA if (SHARED_DATA / "clothing.zip").is_file() else BUNDLED_DATA


@pytest.fixture(scope="session")
def bundled_root() -> Path:
    return BUNDLED_DATA


def write_image(path: Path, value: int = 0, size: int = 4, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value % 256, (value * 7) % 256, (value * 13) % 256)).save(path, fmt)
    return path


def write_folder(root: Path, layout: Mapping[str, Mapping[str, int]]) -> Path:
    """root/<split>/<class>/<i>.png with layout {split: {class: number of images}} (0 = an empty class folder)."""
    for split, classes in layout.items():
        for c, (cls, n) in enumerate(classes.items()):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(root / split / cls / f"{i:03d}.png", value=c * 31 + i)
    return root


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str, layout: Mapping[str, Mapping[str, int]]) -> Path:
        return write_folder(tmp_path / name, layout)

    return make
