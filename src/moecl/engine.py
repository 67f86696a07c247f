"""The continual-learning loop shared by every method: train each task, evaluate every dataset, checkpoint.

run_stream(learner, stream, cfg, run_dir) fills an AccuracyMatrix: a zero-shot row before the first task, then
one row after each task (method.md §5). The loop knows a learner only by its hooks (methods/base.py): setup,
begin_task, training_loss, end_task, begin_evaluation, predict. Batches come from the batch pipeline (batches.py)
on the learner's device; the run's position and results are a RunState (runstate.py). The loop is deterministic
from the seed and resumable from the last checkpoint: the batch order of a task is a pure function of (seed, task,
step), so a resumed run replays exactly, whatever the number of data workers.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moecl.accel import NullLog, TrainingAccelerator, adamw_options
from moecl.batches import BatchPipeline, evaluation_seed, resolve_workers
from moecl.branches import ZERO_SHOT
from moecl.checkpoint import KEEP_CHECKPOINTS, CheckpointStore, crash_point, prefixed, rng_state, set_rng_state
from moecl.config import MIB, RunConfig
from moecl.data.tasks import Task, TaskStream
from moecl.device import Placement
from moecl.methods.base import Learner
from moecl.metrics import AccuracyMatrix
from moecl.progress import bar as progress_bar
from moecl.progress import say
from moecl.runlog import RunLog
from moecl.runstate import RunState, load_optimizer_state, optimizer_state
from moecl.tracking import Trackers, open_trackers, summary_of


class Interrupted(Exception):
    """Raised inside the loop after a stop request (SIGINT/SIGTERM) once a checkpoint has been written."""


# --------------------------------------------------------------------------------------------------------------
# Schedules
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


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
class Engine:
    """Runs one learner over one stream into `run_dir` (log.jsonl, checkpoints/).

    The learner is placed on `placement` (default: cfg.device resolved on this machine) before anything runs."""

    def __init__(
        self,
        learner: Learner,
        stream: TaskStream,
        cfg: RunConfig,
        run_dir: Path,
        quiet: bool = False,
        stop_requested: Callable[[], bool] | None = None,
        placement: Placement | None = None,
    ):
        self.placement = placement or Placement.of(cfg.device)
        self.learner = learner.place(self.placement)
        self.stream = stream
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.stop_requested = stop_requested or (lambda: False)
        # precision / compile / multi-process; no-op by default
        self.accel = TrainingAccelerator.from_config(cfg, self.placement.device)
        self.log = RunLog(self.run_dir / "log.jsonl") if self.accel.is_main else NullLog()
        self.store = CheckpointStore(self.run_dir / "checkpoints", keep=KEEP_CHECKPOINTS)
        self.tracker = Trackers()  # cfg.logging's backends, opened by run() (not for a re-evaluation)
        self.data = self._pipeline()

    def _pipeline(self) -> BatchPipeline:
        model, cfg = self.learner.model, self.cfg
        transforms = (model.image_transform(False), model.image_transform(True))
        cache = context = None
        crops = model.prefix_blocks() == 0  # the prefix is the image: cache decoded crops instead (4x smaller)
        if cfg.backbone.cache_prefix and cfg.data.cache_mb > 0:
            from moecl.backbone.cache import PrefixCache, PrefixContext

            cache = PrefixCache(max_bytes=int(cfg.data.cache_mb * MIB))
            context = PrefixContext.crops(transforms[0]) if crops else PrefixContext.of(model, transforms[0])
        return BatchPipeline(
            model.image_prefix,
            transforms,
            self.placement,
            workers=resolve_workers(cfg.data.workers, self.placement.device),
            prefetch=cfg.data.prefetch,
            batch_size=cfg.optim.eval_batch_size,
            cache=cache,
            context=context,
            log=self.log,
            quiet=self.quiet,
            cache_crops=crops,
            collectives=self.accel.collectives,
        )

    # -- helpers -----------------------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if not self.quiet:
            say(msg)

    def _bar(self, total: int, desc: str):
        return progress_bar(total, desc, disable=self.quiet)

    def global_step(self, task: int, step: int = 0) -> int:
        """Optimiser steps done over the whole stream once `step` steps of task `task` are (the trackers' x axis:
        a training step counts itself, the row after task i sits at the end of task i)."""
        return sum(task_steps(self.cfg, len(t.train)) for t in self.stream.tasks[:task]) + step

    def _open_trackers(self, state: RunState, resumed: bool) -> None:
        if self.accel.is_main:
            where = (state.task, self.global_step(state.task, state.step)) if resumed else None
            self.tracker = open_trackers(self.cfg, self.run_dir, where)

    def _timed(self, state: RunState, key: str, start: float) -> None:
        state.timing[key] = state.timing.get(key, 0.0) + time.perf_counter() - start

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self, state: RunState, tag: str, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.accel.sync_usage(self.learner.model, main_keeps=True)  # all processes get here
        if not self.accel.is_main:  # only the main process writes the run directory
            return
        tensors, learner_state = self.learner.state_for_checkpoint()
        # host copies: a checkpoint does not depend on the device it was written from
        tensors = {f"learner.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
        rng_tensors, rng_json = rng_state()
        tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()})
        opt_json = None
        if optimizer is not None:
            opt_tensors, opt_json = optimizer_state(optimizer)
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
        learner_t = {k: self.placement.put(v) for k, v in prefixed(tensors, "learner.").items()}
        self.learner.restore_from_checkpoint(learner_t, state["learner"])
        self.accel.drop_usage_copies(self.learner.model)
        set_rng_state(prefixed(tensors, "rng."), state["rng"])
        if state.get("scaler") and self.accel.scaler.is_enabled():
            self.accel.scaler.load_state_dict(state["scaler"])
        optim_t = prefixed(tensors, "optim.")
        return RunState.from_json(state["run"]), state.get("optimizer"), optim_t

    # -- main loop ---------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunState:
        """The whole stream from scratch or from the last checkpoint. The trackers stay open for results.finish_run
        (closed here only when the run fails)."""
        try:
            return self._run(resume)
        except BaseException:
            self.tracker.close()
            raise

    def _run(self, resume: bool) -> RunState:
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
        self._open_trackers(state, loaded is not None)
        if state.task == 0 and state.step == 0 and not state.row_done(ZERO_SHOT):
            t0 = time.perf_counter()
            self.learner.setup(stream, self.data)
            self._timed(state, "setup", t0)
            t0 = time.perf_counter()
            self.evaluate(state, learned=0)
            self._timed(state, "eval", t0)
            self.save_checkpoint(state, "zero_shot")
            if self.stop_requested():
                raise Interrupted("stopped after the zero-shot evaluation; resume with --resume")
        task_bar = progress_bar(len(names), "tasks", initial=state.task, disable=self.quiet, leave=True)
        while state.task < len(names):
            i, task = state.task, stream.tasks[state.task]
            self.train_task(state, i, task, opt_json, opt_tensors)
            opt_json, opt_tensors = None, {}
            t0 = time.perf_counter()
            self.accel.sync_usage(self.learner.model)  # multi-process: combine expert usage
            self.learner.end_task(i, task, self.data)
            self._timed(state, "end_task", t0)
            t0 = time.perf_counter()
            self.evaluate(state, learned=i + 1)
            self._timed(state, "eval", t0)
            self.tracker.task_end(i + 1, self.global_step(i + 1), self.learner.task_statistics(i + 1))
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
        # what each process decoded (multi-process runs: each reads about 1/N of the images)
        state.decoded = self.accel.collectives.gather_objects(self.data.decoded)
        return state

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
            load_optimizer_state(optimizer, opt_json, opt_tensors)
        self.learner.train()
        bar = self._bar(total, f"train {task.name}")
        bar.update(state.step)
        self.learner.at_step(i, state.step)
        batches = self.data.training_batches(
            task.train, i, range(state.step, total), cfg.optim.batch_size, cfg.seed, cfg.optim.train_augment
        )
        with contextlib.closing(batches):  # stops the data workers also when a stop request ends the task early
            for batch in batches:
                step = state.step
                lr = cosine_lr(step, total, cfg.optim.warmup_steps, base_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                rows = self.accel.global_rows(batch)  # every process's share together (a collective)
                if rows:
                    loss = self.accel.training_loss(self.learner, batch, i, task, rows)  # autocast, DDP share
                    optimizer.zero_grad(set_to_none=True)
                    self.accel.backward(loss)
                    self.accel.step(optimizer)
                    if step % cfg.logging.every == 0 or step == total - 1:
                        value = loss.item()
                        self.log.write({"event": "step", "task": i, "step": step, "loss": value, "lr": lr})
                        self.tracker.step(i, step, self.global_step(i, step + 1), {"loss": value, "lr": lr})
                        bar.set_postfix(loss=f"{value:.3f}")
                state.step = step + 1
                self.learner.at_step(i, state.step)  # also after a batch with no readable image: one count
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
        stream, m = self.stream, state.matrix
        self.learner.eval()
        self.learner.begin_evaluation(learned)
        # CIL: classes of future steps are not in the label space yet
        evaluated = [
            (j, task.test)
            for j, task in enumerate(stream.tasks)
            if not (stream.class_incremental and learned > 0 and j >= learned)
        ]
        seen_correct = seen_total = 0
        images = forwards = 0
        # optim.eval_augment: the official CIL code reads its test sets through the training transform
        augment = evaluation_seed(self.cfg.seed, learned) if self.cfg.optim.eval_augment else None
        batches = self.data.evaluation_batches(evaluated, pixels=self.learner.eval_needs_pixels(), augment_seed=augment)
        with contextlib.closing(batches), torch.no_grad(), self.accel.eval_autocast():
            if self.accel.world_size > 1:  # the row's classifiers, their prompts shared out (a collective)
                requests = self.learner.row_classifiers(stream, learned, [j for j, _ in evaluated])
                self.learner.build_classifiers(requests, self.accel.collectives)
            for j, test in evaluated:
                task = stream.tasks[j]
                correct = total = agn_correct = 0
                has_agnostic = False
                crash_point(f"eval{learned}-ds{j}")
                bar = self._bar(len(test), f"eval {task.name}")
                for _ in range(self.data.eval_batch_count(test)):
                    batch = next(batches)
                    bar.update(len(batch))
                    if not len(batch):
                        continue
                    pred = self.learner.predict(batch, stream, learned)
                    images += len(batch)
                    forwards += len(batch) if pred.forwards is None else pred.forwards
                    labels = batch.labels
                    target = labels + (task.label_offset if stream.class_incremental else 0)
                    correct += int((pred.logits.argmax(-1) == target).sum())
                    if pred.agnostic_logits is not None:
                        has_agnostic = True
                        agn_correct += int((pred.agnostic_logits.argmax(-1) == labels + pred.agnostic_offset).sum())
                    total += len(batch)
                bar.close()
                # multi-process: each process evaluated every N-th batch; the counts are summed
                counts = self.accel.collectives.sum(torch.tensor([correct, total, agn_correct, int(has_agnostic)]))
                correct, total, agn_correct, has_agnostic = (int(v) for v in counts.tolist())
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
                self.log.write({"event": "eval", "after_task": learned - 1, "dataset": task.name, "accuracy": acc})
        if stream.class_incremental and learned > 0:
            m.set_seen(learned - 1, 100.0 * seen_correct / max(1, seen_total))
        self.learner.end_evaluation(learned, stream, self.accel.collectives.sum)
        images, forwards = (int(v) for v in self.accel.collectives.sum(torch.tensor([images, forwards])).tolist())
        state.set_evaluation_cost(learned, images, forwards)
        self.tracker.evaluation(learned, self.global_step(learned), m)


def run_stream(
    learner: Learner, stream: TaskStream, cfg: RunConfig, run_dir: str | Path, resume: bool = False, quiet: bool = True
) -> AccuracyMatrix:
    """Train `learner` over `stream` into `run_dir` and return the filled accuracy matrix (the library entry point;
    `moecl train` adds the run directory's config, metrics.json and report around it). The learner runs on
    cfg.device ("auto": the first GPU when there is one)."""
    engine = Engine(learner, stream, cfg, Path(run_dir), quiet=quiet)
    matrix = engine.run(resume=resume).matrix
    engine.tracker.finish(matrix, summary_of(matrix))
    return matrix
