"""log.jsonl: one JSON object per line, appended as the run goes.

Every record is written with one write() call and flushed, so a crash leaves at most a partial last line; the
reader skips such a line, and the next write cuts it off before appending. Evaluation records (and any record
written with sync=True) are also fsync'ed, because they carry results.

Resume and duplicates. A resumed run replays the steps after its checkpoint, so the records those steps wrote
before the crash must go. Two ways, both leaving the log exactly as an uninterrupted run would have it:
- exact (preferred): store `log.position()` in the checkpoint's state when saving it; on resume call
  `log.truncate_to(saved_position)`. This also drops records without a step number (e.g. skipped images).
- from the records alone (checkpoints without a stored position): `log.truncate_from(past_checkpoint(task, step))`
  drops the first record belonging to work after the checkpoint and everything after it. Records of steps that
  were not logged (step logging is sparse) cannot be told apart, so this can keep a few unnumbered records.
With no checkpoint at all the run restarts from scratch: `log.clear()`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moecl.checkpoint import atomic_write_bytes

SYNC_EVENTS = frozenset({"eval"})


class RunLog:
    """Append-only JSON-lines log at `path` (created on first write)."""

    def __init__(self, path: str | os.PathLike, sync_events: frozenset[str] = SYNC_EVENTS):
        self.path = Path(path)
        self.sync_events = sync_events
        self._repaired = False

    # -- writing -----------------------------------------------------------------------------------------------
    def write(self, record: Mapping[str, Any], sync: bool | None = None) -> None:
        """Append `record` (a "time" field is added unless present). fsync when `sync`, or by default when the
        record's "event" is an evaluation."""
        data = dict(record)
        data.setdefault("time", round(time.time(), 3))
        try:
            line = json.dumps(data, separators=(",", ":")) + "\n"
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.path}: log record is not JSON-serialisable ({exc}): {record!r}") from exc
        if "\n" in line[:-1]:  # cannot happen with json.dumps, but a multi-line record would break the format
            raise ValueError(f"{self.path}: log record must serialise to one line")
        if not self._repaired:
            self._cut_partial_tail()
            self._repaired = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        do_sync = sync if sync is not None else data.get("event") in self.sync_events
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8"))
            f.flush()
            if do_sync:
                os.fsync(f.fileno())

    def _cut_partial_tail(self) -> None:
        # A crash mid-write leaves a line without its newline; appending to it would glue two records together.
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return
        if not content or content.endswith(b"\n"):
            return
        with open(self.path, "rb+") as f:
            f.truncate(content.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    # -- reading -----------------------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """All complete records. A truncated last line (crash mid-write) is skipped; a damaged line elsewhere
        raises ValueError naming the file and line."""
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = content.split(b"\n")
        out = []
        for n, raw in enumerate(lines):
            if not raw.strip():
                continue
            last_partial = n == len(lines) - 1  # no newline after it: the write was cut off
            try:
                record = json.loads(raw)
            except ValueError as exc:
                if last_partial:
                    break
                raise ValueError(f"{self.path}:{n + 1}: damaged log line ({exc}); remove or fix that line") from exc
            if last_partial:
                break  # parses, but without its newline it may still be a prefix of a longer record
            out.append(record)
        return out

    # -- resume ------------------------------------------------------------------------------------------------
    def position(self) -> int:
        """Size in bytes of the log's complete records, made durable; store it with a checkpoint."""
        if not self._repaired:
            self._cut_partial_tail()
            self._repaired = True
        if self.path.exists():
            with open(self.path, "rb+") as f:
                os.fsync(f.fileno())
        return self._size()

    def truncate_to(self, position: int) -> int:
        """Drop everything after byte `position` (from position()); returns the number of records dropped."""
        if position < 0:
            raise ValueError(f"{self.path}: log position must be >= 0, got {position}")
        size = self._size()
        if size <= position:
            return 0
        with open(self.path, "rb+") as f:
            f.seek(position)
            dropped = f.read().count(b"\n")
            f.truncate(position)
            f.flush()
            os.fsync(f.fileno())
        self._repaired = False  # position may not end on a record boundary if misused; re-check on next write
        return dropped

    def truncate_from(self, predicate: Callable[[dict], bool]) -> int:
        """Drop the first record for which `predicate` is true and every record after it (a damaged or partial
        tail goes too); the kept prefix is rewritten atomically. Returns the number of records dropped."""
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        keep = 0  # byte offset of the end of the kept prefix
        for raw in content.split(b"\n")[:-1]:  # the piece after the final newline is empty or partial
            try:
                record = json.loads(raw) if raw.strip() else None
            except ValueError:
                break
            if record is not None and predicate(record):
                break
            keep += len(raw) + 1
        dropped = sum(1 for raw in content[keep:].split(b"\n") if raw.strip())
        if keep != len(content):
            atomic_write_bytes(self.path, content[:keep])
        self._repaired = True
        return dropped

    def clear(self) -> None:
        """Empty the log (a run restarted from scratch)."""
        if self.path.exists():
            atomic_write_bytes(self.path, b"")
        self._repaired = True


def past_checkpoint(task: int, step: int) -> Callable[[dict], bool]:
    """Predicate for truncate_from: is this engine record work done after the checkpoint at (task, step)?

    The engine's checkpoint (task, step) means: tasks < `task` are finished and evaluated, and `step` optimiser
    steps of task `task` are done. Step records carry "task"/"step"; evaluation records carry "after_task" (-1
    for the zero-shot row), written before the checkpoint of the task they follow.
    """

    def after(record: dict) -> bool:
        if "after_task" in record:
            return record["after_task"] >= task
        if "task" in record and "step" in record:
            return (record["task"], record["step"]) >= (task, step)
        return False

    return after
