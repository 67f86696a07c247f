from __future__ import annotations

from pathlib import Path

import pytest

from moecl.config import StreamConfig
from moecl.data.cil import num_steps, step_bounds
from moecl.data.folder import DataError
from moecl.data.mtil import MTIL_ORDERS, mtil_datasets
from moecl.data.tasks import build_stream, stream_task_count, validate_stream
from moecl.data.templates import CIL_CLASS_ORDERS, CIL_TEMPLATES, TINYIMAGENET_WNIDS_TXT

# CIFAR-100 fine-label names are alphabetical, so sorted folders give the official index; any sorted names do here.
CIFAR_LIKE = [f"class_{i:03d}" for i in range(100)]


@pytest.fixture
def cifar100_like(make_folder, tmp_path: Path) -> Path:
    make_folder("cifar100", {"train": {c: 2 for c in CIFAR_LIKE}, "test": {c: 1 for c in CIFAR_LIKE}})
    return tmp_path


def test_cifar100_ten_steps_follow_the_class_order(cifar100_like: Path):
    cfg = StreamConfig(name="cifar100", kind="cil", steps=10, root=str(cifar100_like))
    stream = build_stream(cfg)
    validate_stream(stream)
    order = CIL_CLASS_ORDERS["cifar100"]
    assert stream.kind == "cil" and len(stream.tasks) == 10 == stream_task_count(cfg)
    for k, task in enumerate(stream.tasks):
        assert task.name == f"cifar100_step{k + 1}" and task.dataset == "cifar100"
        assert task.label_offset == 10 * k and task.templates == CIL_TEMPLATES
        expected = tuple(CIFAR_LIKE[c].replace("_", " ") for c in order[10 * k : 10 * k + 10])
        assert task.classnames == task.train.classnames == task.test.classnames == expected
        assert task.train.class_counts() == [2] * 10 and task.test.class_counts() == [1] * 10
        for split in (task.train, task.test):
            for i in range(len(split)):
                folder = split.key(i).split("/")[-2]  # .../cifar100/<split>/<class>/<file>
                global_label = split.labels[i] + task.label_offset
                assert folder == CIFAR_LIKE[order[global_label]]
    seen = stream.classnames_seen(9)
    assert seen == tuple(CIFAR_LIKE[c].replace("_", " ") for c in order)
    assert stream.classnames_seen(0) == stream.tasks[0].classnames
    assert stream.summary()["num_classes"] == 100


def test_tinyimagenet_steps_hold_the_official_classes(make_folder, tmp_path: Path):
    # the official order indexes wnids.txt (continuum's labels); moecl's label is the sorted wnid: the steps must
    # still hold the paper's classes, i.e. step 1 = wnids.txt[131], wnids.txt[181], ...
    wnids = list(TINYIMAGENET_WNIDS_TXT)
    make_folder("tinyimagenet", {"train": {w: 1 for w in wnids}, "test": {w: 1 for w in wnids}})
    cfg = StreamConfig(name="tinyimagenet", kind="cil", steps=10, base_classes=100, root=str(tmp_path))
    stream = build_stream(cfg)
    official = CIL_CLASS_ORDERS["tinyimagenet"]
    assert len(stream.tasks) == 11 and stream.tasks[0].classnames[0] == "Persian cat"  # wnids.txt[131] n02123394
    for task in stream.tasks:
        for split in (task.train, task.test):
            for i in range(len(split)):
                folder = split.key(i).split("/")[-2]
                assert folder == wnids[official[split.labels[i] + task.label_offset]]


def test_cil_shots_apply_before_the_split(cifar100_like: Path):
    stream = build_stream(StreamConfig(name="cifar100", kind="cil", steps=20, shots=1, root=str(cifar100_like)))
    assert len(stream.tasks) == 20 and all(t.train.class_counts() == [1] * 5 for t in stream.tasks)


def test_step_bounds_base_classes_and_counts():
    assert step_bounds(100, 10)[:2] == [(0, 10), (10, 20)] and step_bounds(100, 50)[-1] == (98, 100)
    tiny = step_bounds(200, 5, base_classes=100)
    assert tiny == [(0, 100), (100, 120), (120, 140), (140, 160), (160, 180), (180, 200)]
    assert len(step_bounds(200, 20, base_classes=100)) == 21
    assert num_steps(StreamConfig(name="tinyimagenet", kind="cil", steps=10, base_classes=100)) == 11
    with pytest.raises(DataError, match="cannot be split into 3 equal steps"):
        step_bounds(100, 3)
    with pytest.raises(DataError, match="base_classes"):
        step_bounds(100, 10, base_classes=100)


def test_mtil_orders_and_counts():
    order1 = mtil_datasets(StreamConfig(name="mtil", order="I"))
    assert order1 == MTIL_ORDERS["I"] and len(order1) == 11 and order1[0] == "aircraft" and order1[-1] == "sun397"
    order2 = mtil_datasets(StreamConfig(name="mtil", order="II"))
    assert order2[0] == "stanford_cars" and order2[-1] == "cifar100" and sorted(order2) == sorted(order1)
    assert stream_task_count(StreamConfig(name="mtil")) == 11
    with pytest.raises(DataError, match="stream.order"):
        mtil_datasets(StreamConfig(name="mtil", order="III"))


def test_duplicate_mtil_dataset_is_rejected(tmp_path: Path):
    with pytest.raises(DataError, match="twice"):
        build_stream(StreamConfig(name="x", datasets=("mnist", "MNIST"), root=str(tmp_path)))
