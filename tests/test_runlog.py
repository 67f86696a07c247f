from __future__ import annotations

import os
from pathlib import Path

import pytest

from moecl.runlog import RunLog, past_checkpoint


def _strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _engine_like(log: RunLog, tasks: int, steps: int, start: tuple[int, int] = (0, 0), crash_at=None) -> list:
    """Writes records the way engine.py does: zero-shot evals, sparse step records, evals after each task.
    Returns the log positions stored with each checkpoint as (task, step, position)."""
    checkpoints = []
    if start == (0, 0):
        for j in range(tasks):
            log.write({"event": "eval", "after_task": -1, "dataset": f"d{j}", "accuracy": 10.0 + j})
        checkpoints.append((0, 0, log.position()))
    task, step = start
    while task < tasks:
        while step < steps:
            if (task, step) == crash_at:
                return checkpoints
            if step == 3:
                log.write({"event": "skipped_image", "dataset": f"d{task}", "key": "bad.jpg"})
            if step % 2 == 0:
                log.write({"event": "step", "task": task, "step": step, "loss": 1.0 / (step + 1)})
            step += 1
            if step % 4 == 0 and step < steps:
                checkpoints.append((task, step, log.position()))
        for j in range(tasks):
            log.write({"event": "eval", "after_task": task, "dataset": f"d{j}", "accuracy": 50.0 + task + j})
        task, step = task + 1, 0
        checkpoints.append((task, 0, log.position()))
    return checkpoints


def test_write_and_read_records_with_time_and_fsync_on_eval(tmp_path: Path, monkeypatch) -> None:
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    log = RunLog(tmp_path / "run" / "log.jsonl")
    assert log.records() == []
    log.write({"event": "step", "task": 0, "step": 0, "loss": 2.5})
    assert synced == []
    log.write({"event": "eval", "after_task": 0, "dataset": "mnist", "accuracy": 97.5})
    assert len(synced) == 1
    log.write({"event": "note", "text": "x"}, sync=True)
    assert len(synced) == 2
    records = log.records()
    assert _strip_time(records) == [
        {"event": "step", "task": 0, "step": 0, "loss": 2.5},
        {"event": "eval", "after_task": 0, "dataset": "mnist", "accuracy": 97.5},
        {"event": "note", "text": "x"},
    ]
    assert all(isinstance(r["time"], float) for r in records)
    assert len(log.path.read_text().splitlines()) == 3


def test_truncated_last_line_is_skipped_and_cut_before_next_write(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = RunLog(path)
    log.write({"event": "step", "task": 0, "step": 0})
    with open(path, "ab") as f:
        f.write(b'{"event":"step","task":0,"st')  # crash mid-write
    assert _strip_time(RunLog(path).records()) == [{"event": "step", "task": 0, "step": 0}]
    resumed = RunLog(path)
    resumed.write({"event": "step", "task": 0, "step": 10})
    assert _strip_time(resumed.records()) == [
        {"event": "step", "task": 0, "step": 0},
        {"event": "step", "task": 0, "step": 10},
    ]


def test_damaged_middle_line_raises_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"a":1}\nnot json\n{"b":2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: damaged log line"):
        RunLog(path).records()


def test_unserialisable_record_is_rejected_without_writing(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "log.jsonl")
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        log.write({"event": "step", "obj": object()})
    assert log.records() == []


@pytest.mark.parametrize("crash_at", [(0, 6), (1, 1), (1, 7), (2, 0)])
def test_resume_with_stored_position_reproduces_uninterrupted_log(tmp_path: Path, crash_at) -> None:
    reference = RunLog(tmp_path / "ref.jsonl")
    _engine_like(reference, tasks=3, steps=8)
    log = RunLog(tmp_path / "log.jsonl")
    checkpoints = _engine_like(log, tasks=3, steps=8, crash_at=crash_at)
    task, step, position = checkpoints[-1]  # the newest checkpoint before the crash
    dropped = RunLog(log.path).truncate_to(position)
    assert dropped > 0 or (task, step) == crash_at
    resumed = RunLog(log.path)
    _engine_like(resumed, tasks=3, steps=8, start=(task, step))
    assert _strip_time(resumed.records()) == _strip_time(reference.records())


def test_truncate_from_past_checkpoint_drops_replayed_work(tmp_path: Path) -> None:
    reference = RunLog(tmp_path / "ref.jsonl")
    _engine_like(reference, tasks=2, steps=8)
    log = RunLog(tmp_path / "log.jsonl")
    _engine_like(log, tasks=2, steps=8, crash_at=(1, 7))
    dropped = log.truncate_from(past_checkpoint(1, 4))  # checkpoint taken after 4 steps of task 1
    assert dropped == 2  # steps 4 and 6 of task 1
    records = _strip_time(log.records())
    assert records[-2:] == [  # the skipped image of step 3 happened before the checkpoint: kept
        {"event": "step", "task": 1, "step": 2, "loss": pytest.approx(1 / 3)},
        {"event": "skipped_image", "dataset": "d1", "key": "bad.jpg"},
    ]
    _engine_like(log, tasks=2, steps=8, start=(1, 4))
    assert _strip_time(log.records()) == _strip_time(reference.records())


def test_past_checkpoint_predicate_and_clear(tmp_path: Path) -> None:
    after = past_checkpoint(2, 0)
    assert not after({"event": "eval", "after_task": 1})
    assert after({"event": "eval", "after_task": 2})
    assert not after({"event": "step", "task": 1, "step": 999})
    assert after({"event": "step", "task": 2, "step": 0})
    assert not after({"event": "skipped_image"})
    log = RunLog(tmp_path / "log.jsonl")
    log.write({"event": "step", "task": 0, "step": 0})
    log.clear()
    assert log.records() == [] and log.path.read_bytes() == b""
    assert log.truncate_from(lambda r: True) == 0
