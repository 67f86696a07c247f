from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moecl.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    CheckpointStore,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_metadata,
    load_tensors,
    rng_state,
    save_tensors,
    set_rng_state,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _enospc_after(monkeypatch: pytest.MonkeyPatch, ok_calls: int = 0) -> None:
    """Make os.write fail with ENOSPC after `ok_calls` successful partial writes (of at most 7 bytes each)."""
    real = os.write
    calls = {"n": 0}

    def fake(fd: int, data) -> int:
        calls["n"] += 1
        if calls["n"] > ok_calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", fake)


# -- atomic files ---------------------------------------------------------------------------------------------
def test_atomic_writes_replace_content_and_leave_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": [1, 2.5, None]})
    assert json.loads(target.read_text()) == {"x": [1, 2.5, None]}
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(target, b"\x00\x01" * 1000)
    assert target.read_bytes() == b"\x00\x01" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_write_disk_full_keeps_old_file_and_names_path(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    _enospc_after(monkeypatch, ok_calls=2)  # fails half-way through the data
    with pytest.raises(OSError, match="disk full") as info:
        atomic_write_text(target, "new content that is longer than fourteen bytes")
    assert str(target) in str(info.value) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_write_other_error_cleans_up(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "x.txt"

    def boom(src, dst):
        raise PermissionError("nope")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(PermissionError):
        atomic_write_text(target, "data")
    assert list(tmp_path.iterdir()) == []


# -- safetensors ----------------------------------------------------------------------------------------------
def test_save_load_tensors_round_trip_with_metadata_and_shared_memory(tmp_path: Path) -> None:
    base = torch.randn(6)
    tensors = {**_tensors(), "tied_a": base, "tied_b": base, "view": base[::2]}  # shared / non-contiguous
    save_tensors(tmp_path / "t.safetensors", tensors, metadata={"task": "mnist"})
    loaded = load_tensors(tmp_path / "t.safetensors")
    _assert_same({k: v.contiguous() for k, v in tensors.items()}, loaded)
    assert load_metadata(tmp_path / "t.safetensors") == {"task": "mnist"}


def test_load_tensors_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_tensors(bad)


# -- checkpoint store -----------------------------------------------------------------------------------------
def test_store_save_layout_manifest_and_latest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt", keep=3)
    assert store.load_latest() == (None, [])
    p1 = store.save("zero_shot", _tensors(0), {"task": 0, "matrix": [[1.5, None]]})
    p2 = store.save("task0", _tensors(1), {"task": 1})
    assert p1.name == "000001-zero_shot" and p2.name == "000002-task0"
    assert sorted(f.name for f in p2.iterdir()) == sorted([TENSORS_FILE, STATE_FILE, MANIFEST_FILE])
    manifest = json.loads((p2 / MANIFEST_FILE).read_text())
    assert manifest["tag"] == "task0" and manifest["seq"] == 2
    assert manifest["files"][STATE_FILE]["size"] == (p2 / STATE_FILE).stat().st_size
    (path, tensors, state), problems = store.load_latest()
    assert path == p2 and state == {"task": 1} and problems == []
    _assert_same(tensors, _tensors(1))
    assert store.load(p1).state == {"task": 0, "matrix": [[1.5, None]]}


def test_store_prunes_to_keep_and_removes_stale_temp_dirs(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    (tmp_path / ".tmp-000009-crashed-abcd").mkdir()
    for i in range(5):
        store.save(f"task{i}", _tensors(i), {"i": i})
    assert [p.name for p in store.checkpoints()] == ["000004-task3", "000005-task4"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["truncate_tensors", "edit_state", "delete_manifest", "delete_tensors"])
def test_latest_falls_back_past_damaged_checkpoint(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    good = store.save("task0", _tensors(0), {"task": 1})
    bad = store.save("task1", _tensors(1), {"task": 2})
    if damage == "truncate_tensors":
        data = (bad / TENSORS_FILE).read_bytes()
        (bad / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "edit_state":
        (bad / STATE_FILE).write_text(json.dumps({"task": 3}) + "\n")  # valid JSON, wrong content
    elif damage == "delete_manifest":
        (bad / MANIFEST_FILE).unlink()
    else:
        (bad / TENSORS_FILE).unlink()
    (path, tensors, state), problems = store.load_latest()
    assert path == good and state == {"task": 1}
    _assert_same(tensors, _tensors(0))
    assert len(problems) == 1 and bad.name in problems[0]


def test_latest_raises_clear_error_when_all_checkpoints_are_damaged(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    p = store.save("task0", _tensors(), {"task": 1})
    (p / STATE_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="no valid checkpoint") as info:
        store.load_latest()
    assert "state.json" in str(info.value) and "--resume" in str(info.value)


def test_store_disk_full_leaves_previous_checkpoint_loadable(tmp_path: Path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    good = store.save("task0", _tensors(0), {"task": 1})
    for ok_calls in (0, 3, 50):  # fail in the tensors file, later in it, and in state/manifest
        _enospc_after(monkeypatch, ok_calls=ok_calls)
        with pytest.raises(OSError, match="disk full") as info:
            store.save("task1", _tensors(1), {"task": 2, "pad": "x" * 200})
        monkeypatch.undo()
        assert "000002-task1" in str(info.value)
        assert [p.name for p in tmp_path.iterdir()] == [good.name]  # nothing half-written left behind
        (path, tensors, state), problems = store.load_latest()
        assert path == good and state == {"task": 1} and problems == []  # no damaged checkpoint to skip
    assert store.save("task1", _tensors(1), {"task": 2}).name == "000002-task1"


def test_store_rejects_bad_tag_and_unserialisable_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="tag"):
        store.save("a/b", {}, {})
    with pytest.raises(CheckpointError, match="JSON"):
        store.save("ok", {}, {"x": object()})
    assert store.checkpoints() == []


# -- RNG state ------------------------------------------------------------------------------------------------
def _draw() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()
    tensors, js = rng_state()
    store = CheckpointStore(tmp_path)
    store.save("rng", tensors, {"rng": js})
    expected = _draw()
    _draw()  # move every generator on
    (_, loaded_t, state), _ = store.load_latest()
    set_rng_state(loaded_t, state["rng"])
    got = _draw()
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_set_rng_state_rejects_incomplete_state() -> None:
    tensors, js = rng_state()
    with pytest.raises(CheckpointError, match="RNG"):
        set_rng_state({}, js)
