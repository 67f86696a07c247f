"""Experiment tracking: the run's numbers sent to CSV files, TensorBoard or Weights & Biases, as it goes.

log.jsonl (runlog.py) is always written and stays the record a run resumes from; the backends of
`logging.backends` are extra views of the same events. The engine calls a Tracker where it writes log.jsonl
records, with a global step as the x axis: the optimiser steps done over the whole stream (a training step
counts itself, so the zero-shot row is at 0 and the row after a task at the step that ended it):
  step(...)        every `logging.every` training steps: loss, LR
  evaluation(...)  after each evaluation row (the zero-shot row first): that row of the accuracy matrix
  task_end(...)    after each task: the learner's statistics (MoE-Adapters: expert usage and frozen experts per
                   block, DDAS routing rates of the row)
  finish(...)      once at the end (results.finish_run): the whole matrix and Transfer / Average / Last
A resumed run drops what the backends hold past its checkpoint (CSV rows, TensorBoard's purge_step) so its files
read as an uninterrupted run's; W&B starts a new run.
"""

from __future__ import annotations

import abc
import csv
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moecl.branches import ZERO_SHOT_NAME
from moecl.config import LoggingConfig, RunConfig
from moecl.metrics import AccuracyMatrix

# What a learner's task_statistics returns: {"scalars": {name: number}, "counts": {name: [count per index]}}
TaskStats = Mapping[str, Mapping[str, Any]]
CSV_DIR, TENSORBOARD_DIR, WANDB_DIR = "csv", "tensorboard", "wandb"  # inside the run directory


class Tracker(abc.ABC):
    """One backend. Methods are called on the main process only, in the order of the module docstring."""

    @abc.abstractmethod
    def step(self, task: int, step: int, global_step: int, scalars: Mapping[str, float]) -> None: ...

    @abc.abstractmethod
    def evaluation(self, learned: int, global_step: int, matrix: AccuracyMatrix) -> None:
        """Row `learned - 1` of `matrix` was just evaluated (learned=0: the zero-shot row)."""

    @abc.abstractmethod
    def task_end(self, learned: int, global_step: int, stats: TaskStats) -> None: ...

    @abc.abstractmethod
    def finish(self, matrix: AccuracyMatrix, summary: Mapping[str, float]) -> None:
        """The end of the run: the final matrix and its summary numbers; closes the backend."""

    def close(self) -> None:  # noqa: B027 - optional: backends without open files need none
        """Flush and release files (also after an interrupted run, where finish is never called)."""


def row_values(matrix: AccuracyMatrix, learned: int) -> dict[str, float]:
    """{"accuracy/<dataset>": acc} of one evaluated row (+ "accuracy/seen" for CIL); missing cells left out."""
    row = matrix.zero_shot if learned == 0 else matrix.row(learned - 1)
    out = {f"accuracy/{name}": v for name, v in zip(matrix.eval_datasets, row, strict=True) if v is not None}
    if matrix.class_incremental and learned > 0 and matrix.seen[learned - 1] is not None:
        out["accuracy/seen"] = matrix.seen[learned - 1]
    return out


def summary_of(matrix: AccuracyMatrix, extra: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Transfer / Average / Last (and Forgetting) of the matrix, plus the numeric entries of `extra`."""
    out = {k: v for k, v in (("transfer", matrix.transfer()), ("average", matrix.average())) if v is not None}
    out.update({k: v for k, v in (("last", matrix.last()), ("forgetting", matrix.forgetting())) if v is not None})
    for k, v in (extra or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


# --------------------------------------------------------------------------------------------------------------
class Trackers(Tracker):
    """Several backends as one (none: every call does nothing)."""

    def __init__(self, backends: Sequence[Tracker] = ()):
        self.backends = list(backends)

    def step(self, task, step, global_step, scalars):
        for b in self.backends:
            b.step(task, step, global_step, scalars)

    def evaluation(self, learned, global_step, matrix):
        for b in self.backends:
            b.evaluation(learned, global_step, matrix)

    def task_end(self, learned, global_step, stats):
        for b in self.backends:
            b.task_end(learned, global_step, stats)

    def finish(self, matrix, summary):
        for b in self.backends:
            b.finish(matrix, summary)
        self.backends = []

    def close(self):
        for b in self.backends:
            b.close()
        self.backends = []


def open_trackers(
    cfg: RunConfig, run_dir: Path, resume: tuple[int, int] | None = None, logging: LoggingConfig | None = None
) -> Trackers:
    """The backends of cfg.logging for the run in `run_dir`. `resume`: (tasks done, global step) of the checkpoint
    a resumed run starts from (what the backends hold past it is dropped); None: a fresh run (their files go)."""
    logging = logging or cfg.logging
    run_dir = Path(run_dir)
    made: list[Tracker] = []
    for name in logging.backends:
        if name == "csv":
            made.append(CSVTracker(run_dir / CSV_DIR, resume))
        elif name == "tensorboard":
            made.append(TensorBoardTracker(run_dir / TENSORBOARD_DIR, resume))
        elif name == "wandb":
            made.append(WandbTracker(run_dir, cfg, logging))
    return Trackers(made)


PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> the optional package it needs


def check_backends(logging: LoggingConfig) -> None:
    """ImportError naming the extra to install when a backend's package is missing (nothing is imported)."""
    from importlib.util import find_spec

    for name in logging.backends:
        if name in PACKAGES and find_spec(PACKAGES[name]) is None:
            raise _missing(PACKAGES[name], name)


def _missing(package: str, backend: str) -> ImportError:
    return ImportError(
        f"logging.backends: '{backend}' needs the '{package}' package: pip install 'moecl[{backend}]' "
        f"(or drop '{backend}' from logging.backends)"
    )


# --------------------------------------------------------------------------------------------------------------
class CSVTracker(Tracker):
    """Plain CSV files in `directory`, appended as the run goes (readable while it runs):
    steps.csv (task, step, global_step, <scalars>), accuracy_matrix.csv (rewritten after every row: one row per
    evaluation row, one column per dataset), task_stats.csv (learned, name, index, value; index empty for a
    scalar) and, at the end, summary.csv (metric, value)."""

    STEP_FIELDS = ("task", "step", "global_step", "loss", "lr")

    def __init__(self, directory: Path, resume: tuple[int, int] | None = None):
        self.dir = Path(directory)
        if resume is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            done, global_step = resume
            self._keep(self.dir / "steps.csv", lambda r: int(r["global_step"]) <= global_step)
            self._keep(self.dir / "task_stats.csv", lambda r: int(r["learned"]) <= done)
            (self.dir / "summary.csv").unlink(missing_ok=True)

    @staticmethod
    def _keep(path: Path, keep) -> None:
        if not path.exists():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], [r for r in reader if keep(r)]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(path)

    def _append(self, name: str, fields: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        path = self.dir / name
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, list(fields), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def step(self, task, step, global_step, scalars):
        self._append("steps.csv", self.STEP_FIELDS, [{"task": task, "step": step, "global_step": global_step, **scalars}])

    def evaluation(self, learned, global_step, matrix):
        self._write_matrix(matrix)

    def _write_matrix(self, matrix: AccuracyMatrix) -> None:
        # the whole matrix each time: its rows are final once written, and a resumed run rewrites the same file
        path, tmp = self.dir / "accuracy_matrix.csv", self.dir / "accuracy_matrix.tmp"
        cil = matrix.class_incremental
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["after_task", *matrix.eval_datasets] + (["seen"] if cil else []))
            writer.writerow([ZERO_SHOT_NAME, *_cells(matrix.zero_shot)] + ([""] if cil else []))
            for i in range(matrix.completed_rows()):
                writer.writerow([matrix.tasks[i], *_cells(matrix.row(i))] + (_cells([matrix.seen[i]]) if cil else []))
        tmp.replace(path)

    def task_end(self, learned, global_step, stats):
        rows = [{"learned": learned, "name": k, "index": "", "value": v} for k, v in stats.get("scalars", {}).items()]
        for name, counts in stats.get("counts", {}).items():
            rows += [{"learned": learned, "name": name, "index": i, "value": c} for i, c in enumerate(counts)]
        self._append("task_stats.csv", ("learned", "name", "index", "value"), rows)

    def finish(self, matrix, summary):
        self._write_matrix(matrix)
        with open(self.dir / "summary.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["metric", "value"])
            writer.writerows(summary.items())


def _cells(values: Sequence[float | None]) -> list[str]:
    return ["" if v is None else f"{v:.4f}" for v in values]


# --------------------------------------------------------------------------------------------------------------
class TensorBoardTracker(Tracker):
    """Event files in `directory` (torch.utils.tensorboard; needs the `tensorboard` package). Scalars train/loss,
    train/lr, accuracy/<dataset>; per task the learner's scalars and its counts as histograms with one bucket
    per index (MoE: how many samples each expert took); at the end results/<metric> and the matrix as text."""

    def __init__(self, directory: Path, resume: tuple[int, int] | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's module imports the tensorboard package
            raise _missing("tensorboard", "tensorboard") from exc
        if resume is None:
            shutil.rmtree(directory, ignore_errors=True)
        # purge_step: events past the checkpoint's step (written before a crash) are hidden on resume
        self.writer = SummaryWriter(str(directory), purge_step=resume[1] + 1 if resume else None)
        self.last_step = 0

    def step(self, task, step, global_step, scalars):
        for k, v in scalars.items():
            self.writer.add_scalar(f"train/{k}", v, global_step)
        self.last_step = global_step

    def evaluation(self, learned, global_step, matrix):
        for k, v in row_values(matrix, learned).items():
            self.writer.add_scalar(k, v, global_step)
        self.writer.add_scalar("tasks_learned", learned, global_step)
        self.writer.flush()
        self.last_step = global_step

    def task_end(self, learned, global_step, stats):
        for k, v in stats.get("scalars", {}).items():
            self.writer.add_scalar(k, v, global_step)
        for k, counts in stats.get("counts", {}).items():
            _count_histogram(self.writer, k, counts, global_step)
        self.writer.flush()

    def finish(self, matrix, summary):
        for k, v in summary.items():
            self.writer.add_scalar(f"results/{k}", v, self.last_step)
        self.writer.add_text("results/accuracy_matrix", matrix.to_markdown(), self.last_step)
        self.close()

    def close(self):
        self.writer.close()


def _count_histogram(writer, tag: str, counts: Sequence[int], step: int) -> None:
    # one bucket per index, holding its count (add_histogram would bin the counts themselves)
    num = sum(counts)
    if num <= 0:
        return
    writer.add_histogram_raw(
        tag,
        min=min(i for i, c in enumerate(counts) if c),
        max=max(i for i, c in enumerate(counts) if c),
        num=num,
        sum=sum(i * c for i, c in enumerate(counts)),
        sum_squares=sum(i * i * c for i, c in enumerate(counts)),
        bucket_limits=[i + 0.5 for i in range(len(counts))],
        bucket_counts=list(counts),
        global_step=step,
    )


# --------------------------------------------------------------------------------------------------------------
class WandbTracker(Tracker):
    """A Weights & Biases run under <run dir>/wandb (needs the `wandb` package). Offline by default: no network or
    account; `wandb sync <run dir>/wandb/offline-run-*` uploads it later. The run's config is the W&B config."""

    def __init__(self, run_dir: Path, cfg: RunConfig, logging: LoggingConfig):
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb", "wandb") from exc
        self.wandb = wandb
        self.run = wandb.init(
            project=logging.wandb_project,
            dir=str(run_dir),
            name=Path(run_dir).resolve().name,
            mode=logging.wandb_mode,
            config=cfg.to_dict(),
        )
        self.last_step = 0

    def _log(self, data: Mapping[str, Any], global_step: int) -> None:
        self.last_step = max(self.last_step, global_step)  # W&B steps never go back
        self.run.log(dict(data), step=self.last_step)

    def step(self, task, step, global_step, scalars):
        self._log({**{f"train/{k}": v for k, v in scalars.items()}, "task": task}, global_step)

    def evaluation(self, learned, global_step, matrix):
        self._log({**row_values(matrix, learned), "tasks_learned": learned}, global_step)

    def task_end(self, learned, global_step, stats):
        data: dict[str, Any] = dict(stats.get("scalars", {}))
        for k, counts in stats.get("counts", {}).items():
            edges = [i - 0.5 for i in range(len(counts) + 1)]
            data[k] = self.wandb.Histogram(np_histogram=(list(counts), edges))
        self._log(data, global_step)

    def finish(self, matrix, summary):
        self.run.summary.update(dict(summary))
        rows = [[ZERO_SHOT_NAME, *matrix.zero_shot]] + [[matrix.tasks[i], *matrix.row(i)] for i in range(matrix.completed_rows())]
        table = self.wandb.Table(columns=["after_task", *matrix.eval_datasets], data=rows)
        self.run.log({"results/accuracy_matrix": table}, step=self.last_step)
        self.close()

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
