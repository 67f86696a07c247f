"""The Learner interface: what a continual-learning method supplies to the shared engine.

The engine owns the loop (data, optimiser, schedule, evaluation, checkpoints) and knows a learner only through the
hooks below (mammoth's begin_task / observe / end_task, here setup / begin_task / training_loss / end_task /
predict). A method's own data passes (DDAS features of a task's images, its reference images) go through the
`DataAccess` the engine hands to `setup` and `end_task`, so the loop never needs to know what a method does with
them. Every batch arrives as a `Batch` on the learner's placement; tensors the learner makes itself go there too
(`Learner.placement`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecl.accel import Collectives
from moecl.backbone.classifier import classifier_from_prompts, encode_prompts, prompt_chunks, prompts, text_classifier
from moecl.batches import Batch, DataAccess
from moecl.config import RunConfig
from moecl.data.tasks import Task, TaskStream
from moecl.device import Placement
from moecl.params import ParameterParts


@dataclass
class Prediction:
    """Logits over one dataset's classes plus, for selector-routed methods, the task each image went to."""

    logits: torch.Tensor  # (B, C)
    routed: torch.Tensor | None = None  # (B,) chosen task index, -1 = zero-shot branch; None = not routed
    # Task-agnostic view (MTIL): logits over the union of the classes of every learned task (plus the evaluated
    # dataset when it is not learned yet); the evaluated dataset's classes start at `agnostic_offset`.
    agnostic_logits: torch.Tensor | None = None
    agnostic_offset: int = 0
    # Image forwards this prediction ran (None: one per image); fewer when results that cannot change were reused.
    forwards: int | None = None


@dataclass(frozen=True)
class ClassifierRequest:
    """One evaluation classifier: the label space's classes and templates, its cache key and the route (task
    index of the text tower's routers; None: the untouched text tower)."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    key: tuple
    route: int | None = None

    @property
    def cache_key(self) -> tuple:
        return (*self.key, self.route)


def assign_chunks(sizes: Sequence[int], world_size: int) -> list[int]:
    """The process that encodes each chunk: the least loaded so far (in prompts; ties: the lowest rank), chunk by
    chunk, so every process gets about total/N prompts. The same on every process (a pure function)."""
    load = [0] * world_size
    owners = []
    for size in sizes:
        owner = min(range(world_size), key=lambda r: (load[r], r))
        load[owner] += size
        owners.append(owner)
    return owners


class Learner(nn.Module, abc.ABC):
    """One continual-learning method. Subclasses live in moecl.methods.<name>."""

    name: str = "learner"

    def __init__(self, model: nn.Module, cfg: RunConfig):
        super().__init__()
        self.model = model  # anything with the MoEAdapterModel encode/tokenize interface
        self.cfg = cfg
        self.placement = Placement()  # the CPU until the engine (or Predictor) places the learner
        self._classifiers: dict[tuple, torch.Tensor] = {}
        self.prompts_encoded = 0  # class prompts this process has encoded for evaluation classifiers

    @classmethod
    @abc.abstractmethod
    def from_config(cls, backbone: nn.Module, cfg: RunConfig, stream: TaskStream | None = None) -> Learner:
        """The method's learner on `backbone` for `cfg` (moecl.methods.build_learner); reads the reference data
        the method needs, if any."""

    @property
    @abc.abstractmethod
    def backbone(self) -> nn.Module:
        """The frozen Backbone the learner runs on (MoE-Adapters wraps it in its model; baselines hold it bare)."""

    # --- parameters ------------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def parts_after(cls, backbone: nn.Module, cfg: RunConfig, num_tasks: int) -> ParameterParts:
        """The parameters this method holds after `num_tasks` tasks, without reading data or fitting anything
        (`moecl params` builds them on the meta device)."""

    @abc.abstractmethod
    def parameter_parts(self) -> ParameterParts:
        """The parameters this learner holds now (metrics.json counts them with moecl.params.parameter_counts)."""

    # --- placement -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.placement.device

    def place(self, placement: Placement) -> Learner:
        """Move everything the learner holds (parameters, buffers, `tensor_state`) to `placement`."""
        self.placement = placement
        return self.to(device=placement.device, dtype=placement.dtype)

    def tensor_state(self) -> list[dict[str, Any]]:
        """The dicts of tensors the learner holds outside its parameters and buffers (prompt tokens, weight
        snapshots, cached classifiers): moved and cast with the module by `.to()` / `place()`."""
        return [self._classifiers]

    def _apply(self, fn, recurse: bool = True):  # nn.Module.to / .double / .cuda all come through here
        super()._apply(fn, recurse)
        for store in self.tensor_state():
            for key, value in store.items():
                if isinstance(value, torch.Tensor):
                    store[key] = fn(value)
                elif isinstance(value, dict):
                    store[key] = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        return self

    # --- task boundaries -------------------------------------------------------------------------------------
    def setup(self, stream: TaskStream, data: DataAccess | None = None) -> None:
        """Once, before the zero-shot evaluation of a fresh run (e.g. fit the selector's reference autoencoder)."""

    def begin_task(self, index: int, task: Task) -> None:
        """Before training task `index` (also again when a run resumes mid-task: must be idempotent)."""

    def end_task(self, index: int, task: Task, data: DataAccess | None = None) -> None:
        """After training task `index` (freezing, weight ensembles, selector fit)."""

    # --- training --------------------------------------------------------------------------------------------
    def at_step(self, index: int, steps_done: int) -> None:
        """The engine's count of optimiser steps done in task `index`, whenever it changes (before the first batch,
        after every batch): the one step counter a method that schedules by step reads."""

    @abc.abstractmethod
    def trainable_parameters(self, index: int) -> list[nn.Parameter]:
        """Parameters the optimiser updates while training task `index` (nothing else may change)."""

    @abc.abstractmethod
    def training_loss(self, batch: Batch, index: int, task: Task) -> torch.Tensor:
        """Loss of one batch (`batch.prefix`: frozen-prefix features of its images, `batch.labels`)."""

    # --- evaluation ------------------------------------------------------------------------------------------
    def eval_needs_pixels(self) -> bool:
        """Whether evaluation batches must also carry pixels (not only the frozen prefix)."""
        return False

    def begin_evaluation(self, learned: int) -> None:
        """Before the evaluation row after `learned` tasks (0 = zero-shot row); rows may be evaluated again
        (`moecl eval`, a resumed run), so per-row statistics are reset here, never accumulated across calls."""

    def end_evaluation(
        self, learned: int, stream: TaskStream, sum_over_processes: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """After the row's last batch. In a multi-process launch each process predicted a share of the batches:
        per-row statistics are combined here with `sum_over_processes` (a collective; the identity otherwise)."""

    @abc.abstractmethod
    def predict(self, batch: Batch, stream: TaskStream, learned: int) -> Prediction:
        """Logits over the label space of `batch.dataset` (see label_space) after `learned` tasks (0 = zero-shot)."""

    def metrics(self, stream: TaskStream) -> dict[str, Any]:
        """Method-specific entries of metrics.json (MoE-Adapters: the DDAS "selector" rates)."""
        return {}

    def task_statistics(self, learned: int) -> dict[str, dict[str, Any]]:
        """For experiment trackers, after the task `learned - 1` and its evaluation row: {"scalars": {name: number},
        "counts": {name: [count per index]}} (MoE-Adapters: expert usage and frozen experts per block, DDAS routing
        rates of the row). Nothing by default."""
        return {}

    def report_extra(self, stream: TaskStream) -> dict[str, Any]:
        """Method-specific details for report.md (kept in checkpoints/report_extra.json)."""
        return {}

    def save_outputs(self, out: Path) -> None:
        """Write what a finished run hands to users into run directory `out` (MoE-Adapters: adapters/, selector/)."""

    # --- helpers shared by every method ---------------------------------------------------------------------
    def eval_classifier(
        self, classnames: Sequence[str], templates: Sequence[str], key: tuple, route: int | None = None
    ) -> torch.Tensor:
        """Normalised class embeddings averaged over all templates, cached per (key, route) while weights are fixed."""
        cache_key = (*key, route)
        if cache_key not in self._classifiers:
            with torch.no_grad():
                self._classifiers[cache_key] = text_classifier(
                    self.model, list(classnames), list(templates), task=route
                )
            self.prompts_encoded += len(classnames) * len(templates)
        return self._classifiers[cache_key]

    def eval_routes(self, learned: int, dataset: int) -> list[int | None]:
        """Every route `predict` may classify a test image of `dataset` through after `learned` tasks (the `route`
        it passes to eval_classifier / union_classifier). Methods without routes: None only."""
        return [None]

    def row_classifiers(self, stream: TaskStream, learned: int, datasets: Sequence[int]) -> list[ClassifierRequest]:
        """Every evaluation classifier the row after `learned` tasks may use for `datasets`: the label space of each
        dataset and, in the task-agnostic view (MTIL, after a task), the union space's, per route of eval_routes."""
        requests = []
        for j in datasets:
            key, classnames, templates = self.label_space(stream, j, learned)
            union = self.union_space(stream, j, learned)[0] if not stream.class_incremental and learned > 0 else []
            for route in self.eval_routes(learned, j):
                requests.append(ClassifierRequest(tuple(classnames), tuple(templates), key, route))
                for k in union:
                    t = stream.tasks[k]
                    requests.append(ClassifierRequest(tuple(t.classnames), tuple(t.templates), ("task", k), route))
        return requests

    def build_classifiers(self, requests: Sequence[ClassifierRequest], collectives: Collectives) -> None:
        """Build the requested classifiers not cached yet, with the class prompts shared out among the processes of
        a launch: each encodes its chunks of the prompts (`assign_chunks`, the chunks eval_classifier encodes), the
        embeddings are gathered and every process assembles the same classifiers. Chunk for chunk the computation
        of eval_classifier, so the result is the single-process one. A collective: every process calls it with the
        same requests (the engine, before each evaluation row of a multi-process launch)."""
        unique = list({r.cache_key: r for r in requests}.values())
        missing = [k for k, r in enumerate(unique) if r.cache_key not in self._classifiers]
        if collectives.world_size > 1:  # a classifier one process built lazily (predict) is rebuilt by all
            missing = sorted(set().union(*collectives.gather_objects(missing)))
        todo = [unique[k] for k in missing]
        if not todo:
            return
        texts = [prompts(r.classnames, r.templates) for r in todo]
        chunks = [(i, s) for i, t in enumerate(texts) for s in prompt_chunks(len(t))]
        owners = assign_chunks([s.stop - s.start for _, s in chunks], collectives.world_size)
        mine = [c for c, owner in enumerate(owners) if owner == collectives.rank]
        parts = [encode_prompts(self.model, texts[chunks[c][0]][chunks[c][1]], todo[chunks[c][0]].route) for c in mine]
        if parts:
            local = torch.cat(parts)
        else:  # nothing to encode here: an empty share of the gather (its rows' width and dtype)
            param = next(iter(self.model.parameters()))
            width = self.backbone.embed_dim
            local = torch.empty(0, width, dtype=torch.promote_types(param.dtype, torch.float32), device=param.device)
        self.prompts_encoded += len(local)
        rows = collectives.gather_rows(local)  # every process's chunks, rank by rank, each rank's in chunk order
        by_chunk: dict[int, torch.Tensor] = {}
        start = 0
        for rank in range(collectives.world_size):
            for c, owner in enumerate(owners):
                if owner == rank:
                    n = chunks[c][1].stop - chunks[c][1].start
                    by_chunk[c] = rows[start : start + n]
                    start += n
        for i, request in enumerate(todo):
            per_prompt = torch.cat([by_chunk[c] for c, (of, _) in enumerate(chunks) if of == i])  # in order
            self._classifiers[request.cache_key] = classifier_from_prompts(
                per_prompt, len(request.classnames), len(request.templates)
            )

    def label_space(self, stream: TaskStream, dataset: int, learned: int) -> tuple[tuple, Sequence[str], Sequence[str]]:
        """(cache key, class names, templates) a test image of `dataset` is classified among.

        MTIL: the dataset's own classes. CIL: every class seen so far (at the zero-shot row: up to that step)."""
        task = stream.tasks[dataset]
        if stream.class_incremental:
            upto = learned - 1 if learned > 0 else dataset
            return ("cil", upto), stream.classnames_seen(upto), task.templates
        return ("task", dataset), task.classnames, task.templates

    def union_space(self, stream: TaskStream, dataset: int, learned: int) -> tuple[list[int], int]:
        """Task-agnostic label space: tasks whose classes are candidates, and where `dataset`'s classes start."""
        tasks = list(range(learned))
        if dataset not in tasks:
            tasks.append(dataset)
        offset = sum(len(stream.tasks[k].classnames) for k in tasks[: tasks.index(dataset)])
        return tasks, offset

    def union_classifier(self, stream: TaskStream, tasks: list[int], route: int | None) -> torch.Tensor:
        parts = []
        for k in tasks:
            t = stream.tasks[k]
            parts.append(self.eval_classifier(t.classnames, t.templates, ("task", k), route))
        return torch.cat(parts)

    def invalidate_classifiers(self, keep_zero_shot: bool = False) -> None:
        """Call whenever weights that the text tower uses change; `keep_zero_shot`: the classifiers of the untouched
        text tower (route None) stay (a method that never changes the backbone computes them once per run)."""
        if not keep_zero_shot:
            self._classifiers.clear()
            return
        for key in [k for k in self._classifiers if k[-1] is not None]:
            del self._classifiers[key]

    @abc.abstractmethod
    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (safetensors) and JSON state that fully restore this learner between steps (never the frozen
        backbone's own weights: they are reloaded from the backbone config)."""

    @abc.abstractmethod
    def restore_from_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Inverse of state_for_checkpoint on a freshly built learner."""
