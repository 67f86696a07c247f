"""Class-incremental (CIL) streams: one dataset's classes, in the protocol's class order, split into steps.

Step k holds the next block of classes of the order; its train/test images are labelled locally 0..C_k-1 and
`label_offset` is the number of classes of earlier steps, so global label = local + offset = position in the order.
CIFAR-100 uses its fine-label index; TinyImageNet's index is its wnids in sorted() order (the ImageFolder order),
onto which templates.cil_class_order maps the official order (given as positions in wnids.txt, the official code's
labels), so each step holds the paper's classes.
"""

from __future__ import annotations

from moecl.config import StreamConfig
from moecl.data.folder import DataError, ImageDataset
from moecl.data.tasks import SplitOpener, Task, TaskStream, collect
from moecl.data.templates import CIL_TEMPLATES, canonical_name, cil_class_order


def cil_dataset(cfg: StreamConfig) -> str:
    if cfg.datasets:
        if len(cfg.datasets) != 1:
            raise DataError(f"a class-incremental stream uses one dataset; stream.datasets lists {list(cfg.datasets)}")
        return canonical_name(cfg.datasets[0])
    return canonical_name(cfg.name)


def num_steps(cfg: StreamConfig) -> int:
    """Tasks of a CIL stream: `steps` increments, plus one base step when base_classes > 0."""
    return cfg.steps + (1 if cfg.base_classes > 0 else 0)


def step_bounds(num_classes: int, steps: int, base_classes: int = 0) -> list[tuple[int, int]]:
    """[start, end) positions in the class order of each step: an optional base block, then `steps` equal blocks."""
    if steps < 1:
        raise DataError(f"stream.steps must be at least 1, got {steps}")
    if not 0 <= base_classes < num_classes:
        raise DataError(f"stream.base_classes must be in 0..{num_classes - 1}, got {base_classes}")
    rest = num_classes - base_classes
    if rest % steps:
        raise DataError(
            f"{rest} classes cannot be split into {steps} equal steps"
            + (f" after {base_classes} base classes" if base_classes else "")
            + "; choose stream.steps (and stream.base_classes) so they divide evenly"
        )
    size = rest // steps
    bounds = [(0, base_classes)] if base_classes else []
    bounds += [(base_classes + k * size, base_classes + (k + 1) * size) for k in range(steps)]
    return bounds


def step_name(dataset: str, k: int) -> str:
    """Task name of step k (0-based) of a CIL stream over `dataset`."""
    return f"{dataset}_step{k + 1}"


def split_by_class(
    dataset: str, train: ImageDataset, test: ImageDataset, order: tuple[int, ...], bounds: list[tuple[int, int]]
) -> list[Task]:
    """One task per step: the images of that step's classes, relabelled locally, with the global offset."""
    tasks = []
    for k, (start, end) in enumerate(bounds):
        classes = order[start:end]
        names = tuple(train.classnames[c] for c in classes)
        tasks.append(
            Task(
                name=step_name(dataset, k),
                dataset=dataset,
                classnames=names,
                templates=CIL_TEMPLATES,
                train=train.relabel(classes, names),
                test=test.relabel(classes, names),
                label_offset=start,
            )
        )
    return tasks


def build_cil_stream(cfg: StreamConfig, opener: SplitOpener) -> TaskStream:
    name = cil_dataset(cfg)
    train, test = collect([lambda: opener.train(name), lambda: opener.test(name)])
    if len(train.classnames) != len(test.classnames):
        raise DataError(f"{name}: train has {len(train.classnames)} classes, test {len(test.classnames)}")
    try:
        order = cil_class_order(name, len(train.classnames))
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    bounds = step_bounds(len(order), cfg.steps, cfg.base_classes)
    return TaskStream(cfg.name, "cil", tuple(split_by_class(name, train, test, order, bounds)))
