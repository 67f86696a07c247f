"""The continual-learning loop shared by every method: train each task, evaluate every dataset, checkpoint.

run_stream(learner, stream, cfg, run_dir) fills an AccuracyMatrix: a zero-shot row before the first task, then
one row after each task (method.md §5). The loop is deterministic from the seed and resumable from the last
checkpoint: the batch order of a task is a pure function of (seed, task, step), so a resumed run replays exactly.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moecl.accel import NullLog, TrainingAccelerator, adamw_options
from moecl.checkpoint import CheckpointStore, crash_point, rng_state, set_rng_state
from moecl.config import RunConfig
from moecl.data.folder import ImageDataset
from moecl.data.tasks import Task, TaskStream
from moecl.methods.base import Learner
from moecl.metrics import AccuracyMatrix
from moecl.runlog import RunLog


class Interrupted(Exception):
    """Raised inside the loop after a stop request (SIGINT/SIGTERM) once a checkpoint has been written."""


@dataclass
class RunState:
    """What the loop needs to continue: position in the stream and the results so far."""

    task: int = 0  # index of the task being trained (== number of tasks fully done)
    step: int = 0  # optimiser steps done in that task
    matrix: AccuracyMatrix | None = None
    agnostic: AccuracyMatrix | None = None  # task-agnostic view (union label space), when the learner gives one
    timing: dict[str, float] = field(default_factory=dict)
    selector_counts: dict[str, int] = field(default_factory=dict)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    # where images of datasets not learned yet went, per checkpoint: {"<dataset>, after <task>": {branch: count}}
    unseen_routing: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "step": self.step,
            "matrix": self.matrix.to_dict() if self.matrix else None,
            "agnostic": self.agnostic.to_dict() if self.agnostic else None,
            "timing": self.timing,
            "selector_counts": self.selector_counts,
            "confusion": self.confusion,
            "unseen_routing": self.unseen_routing,
        }

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        matrix = AccuracyMatrix.from_dict(data["matrix"]) if data.get("matrix") else None
        agnostic = AccuracyMatrix.from_dict(data["agnostic"]) if data.get("agnostic") else None
        return cls(
            task=data["task"],
            step=data["step"],
            matrix=matrix,
            agnostic=agnostic,
            timing=dict(data.get("timing", {})),
            selector_counts=dict(data.get("selector_counts", {})),
            confusion={k: dict(v) for k, v in data.get("confusion", {}).items()},
            unseen_routing={k: dict(v) for k, v in data.get("unseen_routing", {}).items()},
        )


# --------------------------------------------------------------------------------------------------------------
# Schedules and batches
# --------------------------------------------------------------------------------------------------------------
def cosine_lr(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warmup then cosine decay to 0 (the reference's `cosine_lr`)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def task_steps(cfg: RunConfig, n_train: int) -> int:
    if cfg.optim.epochs is not None:
        return cfg.optim.epochs * max(1, math.ceil(n_train / cfg.optim.batch_size))
    return cfg.optim.iterations


def task_lr(cfg: RunConfig, task: Task) -> float:
    return float(cfg.optim.lr_per_task.get(task.dataset, cfg.optim.lr_per_task.get(task.name, cfg.optim.lr)))


def batch_indices(n: int, batch_size: int, seed: int, task_index: int, step: int) -> list[int]:
    """Indices of training batch `step`: seeded per-epoch permutations, so any step can be recomputed on resume."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + task_index * 10_007 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    return perm[pos * batch_size : (pos + 1) * batch_size]


class BatchLoader:
    """Loads images of an ImageDataset into (prefix-or-pixel) tensors, through the frozen-prefix cache if allowed."""

    def __init__(self, learner: Learner, cfg: RunConfig, cache, log: RunLog | None = None):
        self.learner = learner
        self.cfg = cfg
        self.cache = cache
        self.log = log
        self.skipped = 0

    def _pixels(self, ds: ImageDataset, idx: list[int], train: bool, rng_seed: int | None) -> tuple:
        transform = self.learner.model.image_transform(train)
        pix, labels, keys = [], [], []
        for n, i in enumerate(idx):
            img, label = ds[i]
            if img is None:  # on_bad_image: skip
                self.skipped += 1
                if self.log is not None:
                    self.log.write({"event": "skipped_image", "dataset": ds.name, "key": ds.key(i)})
                continue
            rng = random.Random(rng_seed * 100_003 + n) if rng_seed is not None else None
            pix.append(transform(img, rng) if train else transform(img))
            labels.append(label)
            keys.append(ds.key(i))
        if not pix:
            return None, torch.empty(0, dtype=torch.long), []
        return torch.stack(pix), torch.tensor(labels, dtype=torch.long), keys

    def load(self, ds: ImageDataset, idx: list[int], train: bool, rng_seed: int | None = None) -> tuple:
        """-> (prefix features, labels, keys). Augmented training images are never cached (they differ each time)."""
        augment = train and self.cfg.optim.train_augment
        model = self.learner.model
        if self.cache is None or augment:
            pixels, labels, keys = self._pixels(ds, idx, augment, rng_seed)
            if pixels is None:
                return None, labels, keys
            with torch.no_grad():
                return model.image_prefix(pixels), labels, keys
        keys = [ds.key(i) for i in idx]
        labels_all = ds.labels

        def compute(missing: list[int]) -> torch.Tensor:
            pixels, _, got = self._pixels(ds, [idx[m] for m in missing], False, None)
            if pixels is None or len(got) != len(missing):
                raise _SkippedInBatch
            with torch.no_grad():
                return model.image_prefix(pixels)

        try:
            prefix = self.cache.fetch(keys, compute)
            return prefix, torch.tensor([labels_all[i] for i in idx], dtype=torch.long), keys
        except _SkippedInBatch:  # a bad image in a skip-mode dataset: fall back to the uncached path
            pixels, labels, keys = self._pixels(ds, idx, False, None)
            if pixels is None:
                return None, labels, keys
            with torch.no_grad():
                return model.image_prefix(pixels), labels, keys

    def pixels(self, ds: ImageDataset, idx: list[int]) -> tuple:
        """Eval-transformed pixels (for selector features)."""
        return self._pixels(ds, idx, False, None)

    def iterate(self, ds: ImageDataset, batch_size: int) -> Iterator[list[int]]:
        for start in range(0, len(ds), batch_size):
            yield list(range(start, min(len(ds), start + batch_size)))


class _SkippedInBatch(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
class Engine:
    """Runs one learner over one stream into `run_dir` (log.jsonl, checkpoints/)."""

    def __init__(
        self,
        learner: Learner,
        stream: TaskStream,
        cfg: RunConfig,
        run_dir: Path,
        quiet: bool = False,
        stop_requested: Callable[[], bool] | None = None,
    ):
        self.learner = learner
        self.stream = stream
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.stop_requested = stop_requested or (lambda: False)
        self.accel = TrainingAccelerator.from_config(cfg)  # precision / compile / multi-process; no-op by default
        self.log = RunLog(self.run_dir / "log.jsonl") if self.accel.is_main else NullLog()
        self.store = CheckpointStore(self.run_dir / "checkpoints", keep=3)
        cache = None
        if cfg.backbone.cache_prefix:
            from moecl.backbone.cache import PrefixCache

            cache = PrefixCache()
        self.loader = BatchLoader(learner, cfg, cache, self.log)
        self._selector_features: dict[int, torch.Tensor] = {}

    # -- helpers -----------------------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg)

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=self.quiet, leave=False, dynamic_ncols=True)

    def _timed(self, state: RunState, key: str, start: float) -> None:
        state.timing[key] = state.timing.get(key, 0.0) + time.perf_counter() - start

    def selector_features(self, ds_index: int, split: str) -> torch.Tensor:
        """Selector features of a dataset split (eval transform), computed once per run."""
        key = ds_index * 2 + (split == "test")
        if key not in self._selector_features:
            task = self.stream.tasks[ds_index]
            ds = task.test if split == "test" else task.train
            feats = []
            for idx in self.loader.iterate(ds, self.cfg.optim.eval_batch_size):
                pixels, _, _ = self.loader.pixels(ds, idx)
                if pixels is not None:
                    feats.append(self.learner.selector_features(pixels))
            self._selector_features[key] = torch.cat(feats)
        return self._selector_features[key]

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self, state: RunState, tag: str, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.accel.sync_usage(getattr(self.learner, "model", None), main_keeps=True)  # all processes get here
        if not self.accel.is_main:  # only the main process writes the run directory
            return
        tensors, learner_state = self.learner.state_for_checkpoint()
        tensors = {f"learner.{k}": v.contiguous() for k, v in tensors.items()}
        rng_tensors, rng_json = rng_state()
        tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()})
        opt_json = None
        if optimizer is not None:
            opt_tensors, opt_json = _optimizer_state(optimizer)
            tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
        self.store.save(
            tag,
            tensors,
            {
                "run": state.to_json(),
                "learner": learner_state,
                "rng": rng_json,
                "optimizer": opt_json,
                "log_position": self.log.position(),
                # fp16 loss scale and its growth tracker: without them a resumed run would scale differently
                "scaler": self.accel.scaler.state_dict() if self.accel.scaler.is_enabled() else None,
            },
        )

    def load_checkpoint(self) -> tuple[RunState, dict | None, dict[str, torch.Tensor]] | None:
        found, problems = self.store.load_latest()  # CheckpointError when checkpoints exist but none is valid
        for problem in problems:  # a truncated/edited newer checkpoint: say so, resume from the previous good one
            print(f"warning: skipped a damaged checkpoint: {problem}", file=sys.stderr)
        if found is None:
            return None
        _, tensors, state = found
        # drop log records of work after this checkpoint: the resumed run writes them again
        self.log.truncate_to(state["log_position"])
        learner_t = {k[len("learner.") :]: v for k, v in tensors.items() if k.startswith("learner.")}
        self.learner.restore_from_checkpoint(learner_t, state["learner"])
        self.accel.drop_usage_copies(getattr(self.learner, "model", None))
        set_rng_state({k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}, state["rng"])
        if state.get("scaler") and self.accel.scaler.is_enabled():
            self.accel.scaler.load_state_dict(state["scaler"])
        optim_t = {k[len("optim.") :]: v for k, v in tensors.items() if k.startswith("optim.")}
        return RunState.from_json(state["run"]), state.get("optimizer"), optim_t

    # -- main loop ---------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunState:
        stream = self.stream
        names = [t.name for t in stream.tasks]
        state = RunState(matrix=AccuracyMatrix(names, names, kind=stream.kind))
        opt_json, opt_tensors = None, {}
        loaded = self.load_checkpoint() if resume else None
        if loaded is not None:
            state, opt_json, opt_tensors = loaded
            self._say(f"resumed at task {min(state.task + 1, len(names))}/{len(names)}, step {state.step}")
        else:
            self.log.clear()
        if state.task == 0 and state.step == 0 and not _row_done(state.matrix, -1):
            t0 = time.perf_counter()
            self.learner.setup(stream)
            self._fit_reference(state)
            self.evaluate(state, learned=0)
            self._timed(state, "eval", t0)
            self.save_checkpoint(state, "zero_shot")
            if self.stop_requested():
                raise Interrupted("stopped after the zero-shot evaluation; resume with --resume")
        task_bar = tqdm(total=len(names), initial=state.task, desc="tasks", disable=self.quiet, dynamic_ncols=True)
        while state.task < len(names):
            i, task = state.task, stream.tasks[state.task]
            self.train_task(state, i, task, opt_json, opt_tensors)
            opt_json, opt_tensors = None, {}
            t0 = time.perf_counter()
            train_feats = self.selector_features(i, "train") if self.learner.uses_selector() else None
            self.accel.sync_usage(getattr(self.learner, "model", None))  # multi-process: combine expert usage
            self.learner.end_task(i, task, train_feats)
            self._timed(state, "end_task", t0)
            t0 = time.perf_counter()
            self.evaluate(state, learned=i + 1)
            self._timed(state, "eval", t0)
            state.task, state.step = i + 1, 0
            self.save_checkpoint(state, f"task{i}")
            if self.stop_requested() and state.task < len(names):  # a stop during end_task/eval: exit here
                raise Interrupted(f"stopped after task {i + 1}; resume with --resume")
            row = state.matrix.row(i)
            self._say(
                f"[{i + 1}/{len(names)}] {task.name}: acc {row[i]:.1f}%  "
                f"mean over seen {sum(row[: i + 1]) / (i + 1):.1f}%"
            )
            task_bar.update(1)
        task_bar.close()
        return state

    def _fit_reference(self, state: RunState) -> None:
        if not self.learner.uses_selector():
            return
        ref = self.learner.reference_dataset()
        if ref is None:
            return
        t0 = time.perf_counter()
        feats = []
        for idx in self.loader.iterate(ref, self.cfg.optim.eval_batch_size):
            pixels, _, _ = self.loader.pixels(ref, idx)
            if pixels is not None:
                feats.append(self.learner.selector_features(pixels))
        self.learner.fit_reference(torch.cat(feats))
        self._timed(state, "selector", t0)

    def train_task(self, state: RunState, i: int, task: Task, opt_json: dict | None, opt_tensors: dict) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        # On a mid-task resume the restored learner already holds this task's state: begin_task must be idempotent.
        self.learner.begin_task(i, task)
        params = self.learner.trainable_parameters(i)
        if not params:  # nothing to train (zero-shot): no optimizer, no steps
            self.learner.eval()
            self._timed(state, "train", t0)
            return
        self.accel.prepare(self.learner, params)
        total = task_steps(cfg, len(task.train))
        base_lr = task_lr(cfg, task)
        optimizer = torch.optim.AdamW(
            params, lr=base_lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, **adamw_options(params)
        )
        if opt_json is not None:
            _load_optimizer_state(optimizer, opt_json, opt_tensors)
        self.learner.train()
        bar = self._bar(total, f"train {task.name}")
        bar.update(state.step)
        while state.step < total:
            step = state.step
            lr = cosine_lr(step, total, cfg.optim.warmup_steps, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = batch_indices(len(task.train), cfg.optim.batch_size, cfg.seed, i, step)
            images, labels, _ = self.loader.load(task.train, idx, train=True, rng_seed=hash((cfg.seed, i, step)))
            if images is not None and len(labels):
                loss = self.accel.training_loss(self.learner, images, labels, i, task)  # autocast, DDP slice
                optimizer.zero_grad(set_to_none=True)
                self.accel.backward(loss)
                self.accel.step(optimizer)
                if step % 10 == 0 or step == total - 1:
                    self.log.write({"event": "step", "task": i, "step": step, "loss": loss.item(), "lr": lr})
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            state.step = step + 1
            bar.update(1)
            crash_point(f"task{i}-step{state.step}")
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < total:
                self._timed(state, "train", t0)
                t0 = time.perf_counter()
                self.save_checkpoint(state, f"task{i}-step{state.step}", optimizer)
            if self.stop_requested():
                self._timed(state, "train", t0)
                self.save_checkpoint(state, f"task{i}-step{state.step}-stop", optimizer)
                raise Interrupted(f"stopped at task {i + 1}, step {state.step}; resume with --resume")
        bar.close()
        self.learner.eval()
        self._timed(state, "train", t0)

    def evaluate(self, state: RunState, learned: int) -> None:
        """Row `learned - 1` (or the zero-shot row for learned=0) of the accuracy matrix."""
        stream, cfg, m = self.stream, self.cfg, state.matrix
        self.learner.eval()
        seen_correct = seen_total = 0
        for j, task in enumerate(stream.tasks):
            if stream.kind == "cil" and learned > 0 and j >= learned:
                continue  # classes of future steps are not in the label space yet
            correct = total = agn_correct = 0
            has_agnostic = False
            routed_all = []
            crash_point(f"eval{learned}-ds{j}")
            bar = self._bar(len(task.test), f"eval {task.name}")
            for idx in self.loader.iterate(task.test, cfg.optim.eval_batch_size):
                images, labels, _ = self.loader.load(task.test, idx, train=False)
                if images is None:
                    continue
                feats = None
                if self.learner.uses_selector() and learned > 0:
                    feats = self.selector_features(j, "test")[idx[0] : idx[0] + len(labels)]
                with torch.no_grad():
                    pred = self.learner.predict(images, j, stream, learned, feats)
                target = labels + (task.label_offset if stream.kind == "cil" else 0)
                correct += int((pred.logits.argmax(-1) == target).sum())
                if pred.agnostic_logits is not None:
                    has_agnostic = True
                    agn_correct += int((pred.agnostic_logits.argmax(-1) == labels + pred.agnostic_offset).sum())
                total += len(labels)
                if pred.routed is not None:
                    routed_all.append(pred.routed)
                bar.update(len(idx))
            bar.close()
            acc = 100.0 * correct / max(1, total)
            if learned == 0:
                m.set_zero_shot(j, acc)
            else:
                m.set(learned - 1, j, acc)
                if has_agnostic:
                    if state.agnostic is None:
                        state.agnostic = AccuracyMatrix(m.tasks, m.eval_datasets, kind="mtil")
                        for k, v in enumerate(m.zero_shot):
                            state.agnostic.set_zero_shot(k, v)
                    state.agnostic.set(learned - 1, j, 100.0 * agn_correct / max(1, total))
                if j < learned:
                    seen_correct, seen_total = seen_correct + correct, seen_total + total
            if routed_all and learned > 0:
                self._selector_stats(state, torch.cat(routed_all), j, learned)
            self.log.write({"event": "eval", "after_task": learned - 1, "dataset": task.name, "accuracy": acc})
        if stream.kind == "cil" and learned > 0:
            m.set_seen(learned - 1, 100.0 * seen_correct / max(1, seen_total))

    def _selector_stats(self, state: RunState, routed: torch.Tensor, j: int, learned: int) -> None:
        c = state.selector_counts
        names = [t.name for t in self.stream.tasks]
        if j < learned:
            c["seen_total"] = c.get("seen_total", 0) + len(routed)
            c["seen_correct"] = c.get("seen_correct", 0) + int((routed == j).sum())
        else:
            c["unseen_total"] = c.get("unseen_total", 0) + len(routed)
            c["unseen_zero_shot"] = c.get("unseen_zero_shot", 0) + int((routed < 0).sum())
        row = None
        if learned == len(names):  # confusion counts of the final checkpoint, for the report
            row = state.confusion.setdefault(names[j], {})
        elif j >= learned:
            row = state.unseen_routing.setdefault(f"{names[j]}, after {names[learned - 1]}", {})
        if row is not None:
            for r in routed.tolist():
                col = "zero-shot" if r < 0 else names[r]
                row[col] = row.get(col, 0) + 1


def _row_done(matrix: AccuracyMatrix | None, row: int) -> bool:
    if matrix is None:
        return False
    values = matrix.zero_shot if row < 0 else matrix.row(row)
    return values is not None and all(v is not None and not math.isnan(v) for v in values)


def selector_summary(state: RunState) -> dict:
    c = state.selector_counts
    out = {}
    if c.get("seen_total"):
        out["task_selection_accuracy"] = c["seen_correct"] / c["seen_total"]
    if c.get("unseen_total"):
        out["zero_shot_rate_unseen"] = c["unseen_zero_shot"] / c["unseen_total"]
    return out


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().clone().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, js: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in js.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": js["param_groups"]})


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def run_stream(
    learner: Learner, stream: TaskStream, cfg: RunConfig, run_dir: str | Path, resume: bool = False, quiet: bool = True
) -> AccuracyMatrix:
    """Train `learner` over `stream` into `run_dir` and return the filled accuracy matrix (the library entry point;
    `moecl train` adds the run directory's config, metrics.json and report around it)."""
    return Engine(learner, stream, cfg, Path(run_dir), quiet=quiet).run(resume=resume).matrix
