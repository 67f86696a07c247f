from __future__ import annotations

import json
from pathlib import Path

import pytest

from moecl.config import ConfigError, CustomTaskConfig, StreamConfig
from moecl.data.folder import DataError, ImageDataset, ZipSource
from moecl.data.tasks import (
    Task,
    TaskStream,
    build_stream,
    reference_dataset,
    resolve_data_root,
    stream_task_count,
    validate_stream,
)


def test_quickstart_stream_is_the_bundled_subset(bundled_root: Path):
    stream = build_stream(StreamConfig(name="quickstart"))
    validate_stream(stream)
    meta = json.loads((bundled_root / "MANIFEST.json").read_text())["datasets"]
    assert [t.name for t in stream.tasks] == ["caltech101", "mnist", "cifar10", "clothing"]
    assert stream.kind == "mtil" and stream_task_count(StreamConfig(name="quickstart")) == 4
    summary = stream.summary()
    for row in summary["tasks"]:
        assert (row["train"], row["test"]) == (meta[row["name"]]["splits"]["train"], meta[row["name"]]["splits"]["test"])
        assert row["label_offset"] == 0
    caltech, mnist = stream.tasks[0], stream.tasks[1]
    assert len(caltech.templates) == 34 and caltech.classnames == caltech.train.classnames == caltech.test.classnames
    assert mnist.classnames[0] == "0 - zero" and mnist.templates == ('a photo of the number: "{}".',)
    assert caltech.train.key(0).startswith(str(bundled_root.resolve() / "caltech101.zip") + "::train/")
    assert summary["train_images"] == sum(len(t.train) for t in stream.tasks)


def test_mtil_stream_with_dataset_override_shots_and_caps(make_folder, tmp_path: Path):
    make_folder("mnist", {"train": {str(d): 7 for d in range(10)}, "test": {str(d): 3 for d in range(10)}})
    make_folder("clothing", {"train": {"hat": 4, "t_shirt": 9}, "test": {"hat": 2, "t_shirt": 2}})
    cfg = StreamConfig(name="mine", datasets=("MNIST", "clothing"), shots=5, max_test_per_class=2, root=str(tmp_path))
    stream = build_stream(cfg)
    validate_stream(stream)
    mnist, clothing = stream.tasks
    assert (mnist.name, mnist.dataset) == ("mnist", "mnist")
    assert mnist.train.class_counts() == [5] * 10 and mnist.test.class_counts() == [2] * 10
    assert clothing.train.class_counts() == [4, 5] and clothing.classnames == ("hat", "t shirt")
    again = build_stream(cfg)
    assert [again.tasks[0].train.key(i) for i in range(50)] == [mnist.train.key(i) for i in range(50)]
    assert stream_task_count(cfg) == 2


def test_relative_root_resolves_against_the_yaml_folder(make_folder, tmp_path: Path):
    make_folder("data/clothing", {"train": {"hat": 1}, "test": {"hat": 1}})
    cfg = StreamConfig(name="mine", datasets=("clothing",), root="data")
    assert len(build_stream(cfg, base_dir=tmp_path).tasks[0].train) == 1


def test_missing_datasets_are_reported_together(tmp_path: Path):
    cfg = StreamConfig(name="mtil", datasets=("mnist", "cifar10"), root=str(tmp_path))
    with pytest.raises(DataError) as info:
        build_stream(cfg)
    message = str(info.value)
    assert "2 problems" in message and "'mnist' not found" in message and "'cifar10' not found" in message


def test_unknown_stream_name_is_a_clear_error():
    with pytest.raises(DataError, match="unknown stream name"):
        build_stream(StreamConfig(name="nonsense"))
    with pytest.raises(ConfigError, match="stream.kind"):  # the config checks itself (moecl.config)
        StreamConfig(kind="til")


def test_custom_stream_from_task_configs(make_folder, tmp_path: Path, data_root: Path):
    make_folder("yaml/../imgs/digits", {"train": {"0": 2, "1": 2}, "val": {"0": 1, "1": 1}})
    cfg = StreamConfig(
        name="my_stream",
        tasks=(
            CustomTaskConfig(
                name="digits", path="../imgs/digits", test_split="val", classnames={"0": "0 - zero"},
                templates=('a photo of the number: "{}".',),
            ),
            CustomTaskConfig(name="clothes", path=str(data_root / "clothing.zip")),
        ),
    )
    stream = build_stream(cfg, base_dir=tmp_path / "yaml")
    validate_stream(stream)
    digits, clothes = stream.tasks
    assert digits.classnames == ("0 - zero", "1") and digits.dataset == "digits"
    assert digits.train.classnames == digits.test.classnames == digits.classnames
    assert digits.templates == ('a photo of the number: "{}".',)
    assert digits.test.split == "val" and clothes.test.split == "test"
    assert clothes.templates == ("a photo of a {}.",)
    assert "t-shirt" in clothes.classnames and stream_task_count(cfg) == 2
    cil = build_stream(StreamConfig(name="c", kind="cil", tasks=cfg.tasks), base_dir=tmp_path / "yaml")
    assert [t.label_offset for t in cil.tasks] == [0, 2]
    assert cil.classnames_seen(1)[:3] == ("0 - zero", "1", "dress")


def test_custom_stream_rejects_unknown_classname_keys(make_folder, tmp_path: Path):
    make_folder("d", {"train": {"cat": 1}, "test": {"cat": 1}})
    cfg = StreamConfig(name="x", tasks=(CustomTaskConfig(name="d", path="d", classnames={"dog": "a dog"}),))
    with pytest.raises(DataError, match="folders that do not exist.*dog"):
        build_stream(cfg, base_dir=tmp_path)


def _ds(name: str, split: str, classnames: tuple[str, ...], labels: list[int]) -> ImageDataset:
    items = [(ZipSource("/z.zip", f"{split}/{classnames[y]}/{i}.png"), y) for i, y in enumerate(labels)]
    return ImageDataset(name, split, classnames, items)


def test_validate_stream_lists_every_problem():
    ok = Task("ok", "ok", ("a", "b"), ("a {}.",), _ds("ok", "train", ("a", "b"), [0, 1]), _ds("ok", "test", ("a", "b"), [0, 1]))
    empty_class = Task("e", "e", ("a", "b"), ("a {}.",), _ds("e", "train", ("a", "b"), [0]), _ds("e", "test", ("a", "b"), [0, 1]))
    no_test = Task("n", "n", ("a",), ("{} x",), _ds("n", "train", ("a",), [0]), _ds("n", "test", ("a",), []))
    mismatch = Task("m", "m", ("a", "b", "c"), ("no slot",), _ds("m", "train", ("a", "b"), [0, 1]), _ds("m", "test", ("a", "b"), [0, 1]))
    validate_stream(TaskStream("fine", "mtil", (ok,)))
    with pytest.raises(DataError) as info:
        validate_stream(TaskStream("s", "mtil", (ok, empty_class, no_test, mismatch, ok)))
    message = str(info.value)
    assert "task 'e': 1 class(es) without train images" in message and "'b'" in message
    assert "task 'n': no test images" in message
    assert "task 'm': train split (train) has 2 classes but the task has 3 class names" in message
    assert "exactly one '{}'" in message and "duplicate task name" in message
    assert "(6 problems)" in message


def test_resolve_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_root: Path):
    assert resolve_data_root(str(tmp_path)) == tmp_path
    monkeypatch.setenv("MOECL_DATA", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("MOECL_DATA")
    assert resolve_data_root(None).resolve() == data_root.resolve()


def test_reference_dataset_by_name_and_by_path(make_folder, bundled_root: Path):
    ref = reference_dataset("imagenet_sample", bundled_root, max_images=20)
    meta = json.loads((bundled_root / "MANIFEST.json").read_text())["datasets"]["imagenet_sample"]
    assert len(ref) == 20 and ref.split == "test" and len(ref.classnames) == meta["num_classes"] == 300
    assert not any(c.startswith("n0") for c in ref.classnames)  # readable names, not wnids
    assert "goldfish" in ref.classnames
    img, _ = ref[0]
    assert img.mode == "RGB"
    again = reference_dataset("imagenet_sample", bundled_root, max_images=20)
    assert [ref.key(i) for i in range(20)] == [again.key(i) for i in range(20)]
    folder = make_folder("refimgs", {"train": {"x_y": 2}, "val": {"x_y": 1}})
    by_path = reference_dataset(str(folder))
    assert len(by_path) == 3 and by_path.split == "train+val" and by_path.classnames == ("x y",)
