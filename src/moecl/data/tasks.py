"""Tasks and task streams: what the engine trains and evaluates, built from a StreamConfig.

A Task is one dataset (MTIL / custom) or one block of classes (CIL) with its train and test ImageDatasets, class
names and prompt templates. In CIL tasks, labels are local (0..C_k-1); the global label is local + label_offset.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecl.config import StreamConfig
from moecl.data.folder import DataError, ImageDataset, list_splits, open_folder_or_zip
from moecl.data.sampling import limit_per_class, random_subset
from moecl.data.templates import classnames_for

PACKAGE_DIR = Path(__file__).resolve().parents[1]
BUNDLED_DATA = PACKAGE_DIR / "assets" / "data"


@dataclass(frozen=True, eq=False)
class Task:
    name: str
    dataset: str  # registry name (or the custom task's name): the key of per-task settings such as the LR
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    train: ImageDataset
    test: ImageDataset
    label_offset: int = 0  # CIL: global label = local label + label_offset; MTIL: 0


@dataclass(frozen=True, eq=False)
class TaskStream:
    name: str
    kind: str  # "mtil" | "cil"
    tasks: tuple[Task, ...]

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def class_incremental(self) -> bool:
        """CIL: each task adds classes to one growing label space (else MTIL: each task is its own dataset)."""
        return self.kind == "cil"

    def classnames_seen(self, i: int) -> tuple[str, ...]:
        """Class names of tasks 0..i in order: the CIL label space after step i (global label order)."""
        return tuple(c for task in self.tasks[: i + 1] for c in task.classnames)

    def summary(self) -> dict[str, Any]:
        """Task names, class counts and split sizes (`moecl train --dry-run`)."""
        tasks = [
            {
                "name": t.name,
                "dataset": t.dataset,
                "classes": len(t.classnames),
                "label_offset": t.label_offset,
                "train": len(t.train),
                "test": len(t.test),
                "templates": len(t.templates),
            }
            for t in self.tasks
        ]
        return {
            "name": self.name,
            "kind": self.kind,
            "num_tasks": len(self.tasks),
            "num_classes": sum(len(t.classnames) for t in self.tasks) if self.kind == "cil" else None,
            "train_images": sum(len(t.train) for t in self.tasks),
            "test_images": sum(len(t.test) for t in self.tasks),
            "tasks": tasks,
        }


# ----------------------------------------------------------------------------------------------------------------
# Data roots and opening splits
# ----------------------------------------------------------------------------------------------------------------
def bundled_data_root() -> Path:
    """The small real-image subset shipped in the package (caltech101, mnist, cifar10, clothing, imagenet_sample)."""
    return BUNDLED_DATA


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """Explicit root, else $MOECL_DATA, else <repo>/../shared/data when it exists, else the bundled subset."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("MOECL_DATA")
    if env:
        return Path(env).expanduser()
    shared = PACKAGE_DIR.parents[1].parent / "shared" / "data"  # src/moecl -> repo -> ../shared/data
    if shared.is_dir():
        return shared
    return BUNDLED_DATA


def open_split(name: str, root: Path, split: str, on_bad_image: str = "error") -> ImageDataset:
    """Split `split` of registry dataset `name` under `root` (zip, ImageFolder or official layout), with readable
    class names; a clear error says where it looked and how to get the data."""
    from moecl.data import registry

    return registry.open_split(name, root, split, on_bad_image)


@dataclass(frozen=True)
class SplitOpener:
    """Opens train/test splits with the stream's root, bad-image policy and seeded per-class limits."""

    root: Path
    on_bad_image: str = "error"
    seed: int = 42
    shots: int | None = None
    max_train_per_class: int | None = None
    max_test_per_class: int | None = None

    @classmethod
    def from_config(cls, cfg: StreamConfig, root: Path, seed: int) -> SplitOpener:
        return cls(root, cfg.on_bad_image, seed, cfg.shots, cfg.max_train_per_class, cfg.max_test_per_class)

    def open(self, name: str, split: str) -> ImageDataset:
        return open_split(name, self.root, split, self.on_bad_image)

    def limit_train(self, ds: ImageDataset, tag: str) -> ImageDataset:
        ds = limit_per_class(ds, self.shots, self.seed, f"{tag}/shots")  # k-shot: the same images in every run
        return limit_per_class(ds, self.max_train_per_class, self.seed, f"{tag}/train")

    def limit_test(self, ds: ImageDataset, tag: str) -> ImageDataset:
        return limit_per_class(ds, self.max_test_per_class, self.seed, f"{tag}/test")

    def train(self, name: str, split: str = "train") -> ImageDataset:
        return self.limit_train(self.open(name, split), name)

    def test(self, name: str, split: str = "test") -> ImageDataset:
        return self.limit_test(self.open(name, split), name)


def collect(builders: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run every builder; raise one DataError listing all failures (missing datasets / splits) at once."""
    results, errors = [], []
    for build in builders:
        try:
            results.append(build())
        except (DataError, OSError, ValueError) as exc:
            if str(exc) not in errors:  # e.g. a missing dataset fails for its train and test split alike
                errors.append(str(exc))
    if errors:
        if len(errors) == 1:
            raise DataError(errors[0])
        raise DataError(f"{len(errors)} problems with the task stream:\n  - " + "\n  - ".join(errors))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Building streams
# ----------------------------------------------------------------------------------------------------------------
def stream_data_root(cfg: StreamConfig, base_dir: Path | None = None) -> Path:
    """Where the stream's datasets (and, by default, its reference images) are read from."""
    if cfg.root and base_dir is not None and not Path(cfg.root).expanduser().is_absolute():
        return resolve_data_root(base_dir / cfg.root)
    if cfg.name == "quickstart" and not cfg.root and not cfg.tasks:
        return BUNDLED_DATA  # the quickstart is the small bundled subset even when full copies are around
    return resolve_data_root(cfg.root)


def build_stream(cfg: StreamConfig, base_dir: Path | None = None, seed: int = 42) -> TaskStream:
    """The task stream `cfg` describes: custom (cfg.tasks; paths relative to base_dir, the YAML's folder), "mtil"
    (Order I/II or cfg.datasets), "quickstart" (bundled caltech101 -> mnist -> cifar10 -> clothing), "cifar100" /
    "tinyimagenet" class-incremental (kind "cil"), or any registry dataset with kind "cil". `seed` drives few-shot
    and per-class-cap sampling (per dataset, machine-independent)."""
    from moecl.data import cil, mtil

    opener = SplitOpener.from_config(cfg, stream_data_root(cfg, base_dir), seed)
    if cfg.tasks:
        return build_custom_stream(cfg, opener, base_dir)
    if cfg.kind == "cil":
        return cil.build_cil_stream(cfg, opener)
    return mtil.build_mtil_stream(cfg, opener)


def build_custom_stream(cfg: StreamConfig, opener: SplitOpener, base_dir: Path | None = None) -> TaskStream:
    """Tasks from folders/zips (CustomTaskConfig). With kind "cil", each task adds its classes to one label space."""
    from moecl.data.templates import DEFAULT_TEMPLATES, rename_classes

    base = Path(base_dir) if base_dir is not None else Path.cwd()

    def build(tc) -> tuple[ImageDataset, ImageDataset, tuple[str, ...]]:
        path = Path(tc.path).expanduser()
        path = path if path.is_absolute() else base / path
        train = open_folder_or_zip(path, tc.train_split, name=tc.name, on_bad_image=cfg.on_bad_image)
        test = open_folder_or_zip(path, tc.test_split, name=tc.name, on_bad_image=cfg.on_bad_image)
        unknown = sorted(set(tc.classnames or {}) - set(train.classnames))
        if unknown:
            raise DataError(
                f"task '{tc.name}': classnames given for folders that do not exist in {path}/{tc.train_split}: "
                f"{', '.join(unknown)} (folders: {', '.join(train.classnames)})"
            )
        names = rename_classes(train.classnames, tc.classnames)
        if test.classnames == train.classnames:
            test = test.with_classnames(names)
        return opener.limit_train(train.with_classnames(names), tc.name), opener.limit_test(test, tc.name), names

    built = collect([lambda tc=tc: build(tc) for tc in cfg.tasks])
    tasks, offset = [], 0
    for tc, (train, test, names) in zip(cfg.tasks, built, strict=True):
        templates = tuple(tc.templates) if tc.templates else DEFAULT_TEMPLATES
        tasks.append(Task(tc.name, tc.name, names, templates, train, test, offset if cfg.kind == "cil" else 0))
        offset += len(names)
    return TaskStream(cfg.name, cfg.kind, tuple(tasks))


def stream_task_count(cfg: StreamConfig) -> int:
    """Number of tasks `cfg` gives, without opening any data (for `moecl params`)."""
    from moecl.data import cil, mtil

    if cfg.tasks:
        return len(cfg.tasks)
    if cfg.kind == "cil":
        return cil.num_steps(cfg)
    return len(mtil.mtil_datasets(cfg))


# ----------------------------------------------------------------------------------------------------------------
# Validation and reference data
# ----------------------------------------------------------------------------------------------------------------
def validate_stream(stream: TaskStream) -> None:
    """Raise one DataError listing every problem found before training: empty tasks, splits or classes, class
    name counts that disagree, templates without "{}", duplicate task names."""
    problems: list[str] = []
    seen: set[str] = set()
    if not stream.tasks:
        problems.append("the stream has no tasks")
    for t in stream.tasks:
        where = f"task '{t.name}'"
        if t.name in seen:
            problems.append(f"{where}: duplicate task name (task names must be unique)")
        seen.add(t.name)
        for split, ds in (("train", t.train), ("test", t.test)):
            if len(ds.classnames) != len(t.classnames):
                problems.append(
                    f"{where}: {split} split ({ds.split}) has {len(ds.classnames)} classes but the task has "
                    f"{len(t.classnames)} class names"
                )
                continue
            if len(ds) == 0:
                problems.append(f"{where}: no {split} images ({ds.name}/{ds.split})")
                continue
            empty = [t.classnames[c] for c, n in enumerate(ds.class_counts()) if n == 0]
            if empty:
                shown = ", ".join(repr(c) for c in empty[:10]) + (" ..." if len(empty) > 10 else "")
                problems.append(f"{where}: {len(empty)} class(es) without {split} images ({ds.name}/{ds.split}): {shown}")
        if tuple(t.train.classnames) != tuple(t.test.classnames) and len(t.train.classnames) == len(t.test.classnames):
            problems.append(f"{where}: train and test class lists differ; both splits need the same classes")
        bad = [tpl for tpl in t.templates if tpl.count("{}") != 1]
        if not t.templates:
            problems.append(f"{where}: no prompt templates")
        elif bad:
            problems.append(f"{where}: templates must contain exactly one '{{}}' for the class name: {bad}")
    if problems:
        raise DataError(f"stream '{stream.name}' is not usable ({len(problems)} problems):\n  - " + "\n  - ".join(problems))


def reference_dataset(
    name_or_path: str,
    root: str | os.PathLike | None = None,
    max_images: int | None = None,
    seed: int = 42,
    splits: Sequence[str] | None = None,
) -> ImageDataset:
    """Reference images for DDAS / ZSCL: every split of a folder/zip path, or of a registry dataset under the data
    root (e.g. imagenet_sample, tinyimagenet; imagenet_sample falls back to the bundled copy), or only `splits`; at
    most `max_images`, drawn with `seed` independently of file listing order."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        ds = _all_splits(path, splits)
    else:
        ds = _registry_all_splits(name_or_path, resolve_data_root(root), splits)
    return random_subset(ds, max_images, seed, ds.name)


def _only(present: Sequence[str], wanted: Sequence[str] | None, where: str) -> list[str]:
    if wanted is None:
        return list(present)
    missing = [s for s in wanted if s not in present]
    if missing:
        raise DataError(f"reference data {where}: no split {', '.join(missing)} (splits: {', '.join(present)})")
    return list(wanted)


def _all_splits(path: Path, wanted: Sequence[str] | None = None) -> ImageDataset:
    name = path.stem if path.is_file() else path.name
    splits = list_splits(path) if path.is_dir() or path.suffix.lower() == ".zip" else []
    if not splits:
        raise DataError(f"{path}: no splits found; expected a folder or zip laid out as <split>/<class>/<image>")
    splits = _only(splits, wanted, str(path))
    parts = [open_folder_or_zip(path, s, name=name) for s in splits]
    return _concat(name, parts, str(path), classnames_for(name, parts[0].classnames))


def _registry_all_splits(name: str, root: Path, wanted: Sequence[str] | None = None) -> ImageDataset:
    from moecl.data import registry

    info = registry.get_dataset(name)
    if registry.locate(info.name, root) is None and registry.locate(info.name, BUNDLED_DATA) is not None:
        root = BUNDLED_DATA  # e.g. imagenet_sample ships with the package
    parts, errors = [], []
    for split in _only(list(info.splits), wanted, info.name):
        try:
            parts.append(registry.open_split(info.name, root, split))
        except DataError as exc:  # a copy may hold only some of the splits
            if wanted is not None:  # ... but not of the ones asked for
                raise
            errors.append(exc)
    if not parts:
        raise DataError(f"reference data: {errors[0]} (or set selector.reference to a folder/zip, or null)")
    return _concat(info.name, parts, f"{root}/{info.name}", parts[0].classnames)


def _concat(name: str, parts: Sequence[ImageDataset], where: str, classnames: Sequence[str]) -> ImageDataset:
    for p in parts[1:]:
        if p.classnames != parts[0].classnames:
            raise DataError(f"{where}: splits {[p.split for p in parts]} have different classes; use one split")
    items = [item for p in parts for item in p.items]
    return ImageDataset(name, "+".join(p.split for p in parts), classnames, items)
