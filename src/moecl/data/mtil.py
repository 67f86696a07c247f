"""Multi-domain task-incremental (MTIL) streams: one task per dataset, in the protocol's order (method.md §5)."""

from __future__ import annotations

from moecl.config import StreamConfig
from moecl.data.folder import DataError
from moecl.data.tasks import SplitOpener, Task, TaskStream, collect
from moecl.data.templates import canonical_name, templates_for

MTIL_ORDERS: dict[str, tuple[str, ...]] = {
    "I": (
        "aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
        "stanford_cars", "sun397",
    ),
    "II": (
        "stanford_cars", "food", "mnist", "oxford_pet", "flowers", "sun397", "aircraft", "caltech101", "dtd",
        "eurosat", "cifar100",
    ),
}
# The offline default stream over the bundled subset (src/moecl/assets/data).
QUICKSTART_DATASETS: tuple[str, ...] = ("caltech101", "mnist", "cifar10", "clothing")


def mtil_datasets(cfg: StreamConfig) -> tuple[str, ...]:
    """Dataset order of an MTIL-kind stream: cfg.datasets, else the quickstart list, else MTIL Order I / II."""
    if cfg.datasets:
        return tuple(canonical_name(d) for d in cfg.datasets)
    if cfg.name == "quickstart":
        return QUICKSTART_DATASETS
    if cfg.name != "mtil":
        raise DataError(
            f"stream '{cfg.name}': unknown stream name; use mtil, quickstart, cifar100 / tinyimagenet (kind cil), "
            "list stream.datasets, or give stream.tasks for a custom stream"
        )
    order = str(cfg.order).upper()
    if order not in MTIL_ORDERS:
        raise DataError(f"stream.order must be one of {', '.join(MTIL_ORDERS)}, got {cfg.order!r}")
    return MTIL_ORDERS[order]


def build_mtil_stream(cfg: StreamConfig, opener: SplitOpener) -> TaskStream:
    """One task per dataset with its official train/test splits, readable class names and all its templates."""
    names = mtil_datasets(cfg)
    if len(set(names)) != len(names):
        raise DataError(f"stream.datasets lists a dataset twice: {list(names)}")

    def build(name: str) -> Task:
        train, test = opener.train(name), opener.test(name)
        return Task(name, name, train.classnames, templates_for(name), train, test)

    return TaskStream(cfg.name, "mtil", tuple(collect([lambda n=n: build(n) for n in names])))
