"""The accuracy matrix of a continual-learning run and its summary metrics (method.md §5, design.md metrics.json).

A[i][j] is the top-1 accuracy (%) on eval dataset j after training task i; the zero-shot row is the untouched
model. With T tasks and eval datasets in training order:
- Transfer  = mean over j = 1..T-1 of (mean over i < j of A[i][j])   (zero-shot ability on not-yet-learned tasks)
- Average   = mean of all A[i][j]
- Last      = mean over j of A[T-1][j]
- Forgetting = mean over j < T-1 of (max over j <= i < T-1 of A[i][j]) - A[T-1][j]
An eval dataset that is not one of the tasks counts as never learned (every row contributes to its transfer).

Class-incremental ("cil") runs only fill A[i][j] for j <= i (later steps' classes are not in the label space yet)
and store, per step, the accuracy on all classes seen so far (`set_seen`): there Average is the mean of those and
Last the final one (the CIL "Avg" and "Last"); Transfer is undefined (None).

Missing entries are None. A partially filled matrix (an interrupted run) gives the metrics of its leading complete
rows, treating the last complete row as "final"; None when no row is complete.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

KINDS = ("mtil", "cil")

Cell = float | None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(value: Any, where: str) -> Cell:
    """None/NaN -> None (not measured); anything else must be a real number."""
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: accuracy must be a number or null, got {value!r}") from exc
    return None if math.isnan(out) else out


class AccuracyMatrix:
    """Zero-shot row + one row per task, filled as the run goes; metrics computed from what is filled."""

    def __init__(self, tasks: Sequence[str], eval_datasets: Sequence[str] | None = None, kind: str = "mtil"):
        if kind not in KINDS:
            raise ValueError(f"AccuracyMatrix kind must be one of {KINDS}, got '{kind}'")
        if not tasks:
            raise ValueError("AccuracyMatrix needs at least one task")
        self.tasks = [str(t) for t in tasks]
        self.eval_datasets = [str(d) for d in (eval_datasets if eval_datasets is not None else tasks)]
        if kind == "cil" and self.eval_datasets != self.tasks:
            raise ValueError("a class-incremental AccuracyMatrix has one column per step (eval_datasets == tasks)")
        self.kind = kind
        n_rows, n_cols = len(self.tasks), len(self.eval_datasets)
        self.zero_shot: list[Cell] = [None] * n_cols
        self.rows: list[list[Cell]] = [[None] * n_cols for _ in range(n_rows)]
        self.seen: list[Cell] = [None] * n_rows  # cil: accuracy on all classes seen so far, after each step

    # -- filling -----------------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def class_incremental(self) -> bool:
        return self.kind == "cil"

    def _check(self, i: int | None, j: int | None) -> None:
        if i is not None and not 0 <= i < len(self.tasks):
            raise IndexError(f"task row {i} out of range (0..{len(self.tasks) - 1})")
        if j is not None and not 0 <= j < len(self.eval_datasets):
            raise IndexError(f"eval column {j} out of range (0..{len(self.eval_datasets) - 1})")

    def set_zero_shot(self, j: int, acc: float | None) -> None:
        self._check(None, j)
        self.zero_shot[j] = _cell(acc, f"zero_shot[{j}]")

    def set(self, i: int, j: int, acc: float | None) -> None:
        self._check(i, j)
        self.rows[i][j] = _cell(acc, f"accuracy_matrix[{i}][{j}]")

    def set_seen(self, i: int, acc: float | None) -> None:
        """cil: accuracy on all classes seen so far after step i."""
        if not self.class_incremental:
            raise ValueError("set_seen is for class-incremental (kind='cil') matrices")
        self._check(i, None)
        self.seen[i] = _cell(acc, f"seen_accuracy[{i}]")

    def row(self, i: int) -> list[Cell]:
        self._check(i, None)
        return list(self.rows[i])

    # -- completeness ------------------------------------------------------------------------------------------
    def _learned_at(self, j: int) -> int:
        """Index of the task that trains column j's dataset (T when it is never trained)."""
        name = self.eval_datasets[j]
        return self.tasks.index(name) if name in self.tasks else len(self.tasks)

    def _expected(self, i: int) -> list[int]:
        """Columns row i must have: all of them (mtil), or the steps seen so far (cil)."""
        return list(range(i + 1)) if self.class_incremental else list(range(len(self.eval_datasets)))

    def _row_complete(self, i: int) -> bool:
        if any(self.rows[i][j] is None for j in self._expected(i)):
            return False
        return not self.class_incremental or self.seen[i] is not None

    def completed_rows(self) -> int:
        """Number of leading rows that are fully filled (tasks done)."""
        n = 0
        while n < len(self.tasks) and self._row_complete(n):
            n += 1
        return n

    def is_complete(self) -> bool:
        return all(v is not None for v in self.zero_shot) and self.completed_rows() == len(self.tasks)

    # -- metrics -----------------------------------------------------------------------------------------------
    def transfer(self) -> float | None:
        if self.class_incremental:
            return None
        rows = self.completed_rows()
        per_column = []
        for j in range(len(self.eval_datasets)):
            above = [self.rows[i][j] for i in range(min(self._learned_at(j), rows))]
            if above:
                per_column.append(_mean(above))
        return _mean(per_column)

    def average(self) -> float | None:
        rows = self.completed_rows()
        if self.class_incremental:
            return _mean([self.seen[i] for i in range(rows)])
        return _mean([v for i in range(rows) for v in self.rows[i]])

    def last(self) -> float | None:
        rows = self.completed_rows()
        if rows == 0:
            return None
        if self.class_incremental:
            return self.seen[rows - 1]
        return _mean(self.rows[rows - 1])

    def forgetting(self) -> float | None:
        rows = self.completed_rows()
        if rows < 2:
            return None
        final = rows - 1
        drops = []
        for j in range(len(self.eval_datasets)):
            start = self._learned_at(j)
            if start < final:
                best = max(self.rows[i][j] for i in range(start, final))
                drops.append(best - self.rows[final][j])
        return _mean(drops)

    # -- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The metrics.json fields (plus kind, forgetting and, for cil, seen_accuracy); None for missing."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "tasks": list(self.tasks),
            "eval_datasets": list(self.eval_datasets),
            "zero_shot": list(self.zero_shot),
            "accuracy_matrix": [list(r) for r in self.rows],
            "transfer": self.transfer(),
            "average": self.average(),
            "last": self.last(),
            "forgetting": self.forgetting(),
        }
        if self.class_incremental:
            out["seen_accuracy"] = list(self.seen)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMatrix:
        """Inverse of to_dict; also reads a metrics.json. Summary fields in `data` are recomputed, not trusted."""
        try:
            tasks = data["tasks"]
            # metrics.json may lack "kind": its cil runs are recognised by their seen_accuracy list
            kind = data.get("kind") or ("cil" if data.get("seen_accuracy") is not None else "mtil")
            matrix = cls(tasks, data.get("eval_datasets", tasks), kind=kind)
            zero_shot = data.get("zero_shot") or [None] * len(matrix.eval_datasets)
            rows = data.get("accuracy_matrix") or []
        except KeyError as exc:
            raise ValueError(f"accuracy matrix data is missing the key {exc}") from exc
        n_cols = len(matrix.eval_datasets)
        if len(zero_shot) != n_cols:
            raise ValueError(f"zero_shot has {len(zero_shot)} values for {n_cols} eval datasets")
        if len(rows) > len(matrix.tasks):
            raise ValueError(f"accuracy_matrix has {len(rows)} rows for {len(matrix.tasks)} tasks")
        for j, v in enumerate(zero_shot):
            matrix.set_zero_shot(j, v)
        for i, row in enumerate(rows):
            if len(row) != n_cols:
                raise ValueError(f"accuracy_matrix row {i} has {len(row)} values for {n_cols} eval datasets")
            for j, v in enumerate(row):
                matrix.set(i, j, v)
        if matrix.class_incremental:
            for i, v in enumerate(data.get("seen_accuracy") or []):
                matrix.set_seen(i, v)
        return matrix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AccuracyMatrix) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"AccuracyMatrix(kind={self.kind!r}, tasks={len(self.tasks)}, done={self.completed_rows()})"

    # -- presentation ------------------------------------------------------------------------------------------
    def to_markdown(self, digits: int = 1) -> str:
        """Table: zero-shot row, one row per task (labelled by task name), then the summary metrics."""

        def fmt(v: Cell) -> str:
            return "–" if v is None else f"{v:.{digits}f}"

        cil = self.class_incremental
        head = ["after task", *self.eval_datasets] + (["seen classes"] if cil else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines.append("| zero-shot | " + " | ".join(fmt(v) for v in self.zero_shot) + (" | – |" if cil else " |"))
        for i, name in enumerate(self.tasks):
            cells = [fmt(v) for v in self.rows[i]] + ([fmt(self.seen[i])] if cil else [])
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if cil:
            names = [("Avg", self.average()), ("Last", self.last()), ("Forgetting", self.forgetting())]
        else:
            names = [
                ("Transfer", self.transfer()),
                ("Average", self.average()),
                ("Last", self.last()),
                ("Forgetting", self.forgetting()),
            ]
        lines.append("| " + " | ".join(n for n, _ in names) + " |")
        lines.append("|" + "---|" * len(names))
        lines.append("| " + " | ".join(fmt(v) for _, v in names) + " |")
        done = self.completed_rows()
        if done < len(self.tasks):
            lines.append("")
            lines.append(f"Partial run: {done} of {len(self.tasks)} tasks done; metrics cover the completed rows.")
        return "\n".join(lines) + "\n"
