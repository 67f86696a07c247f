"""The Learner interface: what a continual-learning method supplies to the shared engine.

The engine owns the loop (data, optimiser, schedule, evaluation, checkpoints); a Learner only says which
parameters train, what the loss of a batch is, what happens at task boundaries and how an image is classified.
That keeps one training loop for every method (no copy-pasted loops).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moecl.backbone.classifier import text_classifier
from moecl.config import RunConfig
from moecl.data.tasks import Task, TaskStream


@dataclass
class Prediction:
    """Logits over one dataset's classes plus, for selector-routed methods, the task each image went to."""

    logits: torch.Tensor  # (B, C)
    routed: torch.Tensor | None = None  # (B,) chosen task index, -1 = zero-shot branch; None = not routed
    # Task-agnostic view (MTIL): logits over the union of the classes of every learned task (plus the evaluated
    # dataset when it is not learned yet); the evaluated dataset's classes start at `agnostic_offset`.
    agnostic_logits: torch.Tensor | None = None
    agnostic_offset: int = 0


class Learner(nn.Module, abc.ABC):
    """One continual-learning method. Subclasses live in moecl.methods.<name>."""

    name: str = "learner"

    def __init__(self, model: nn.Module, cfg: RunConfig):
        super().__init__()
        self.model = model  # anything with the MoEAdapterModel encode/tokenize interface
        self.cfg = cfg
        self._classifiers: dict[tuple, torch.Tensor] = {}

    # --- task boundaries -------------------------------------------------------------------------------------
    def setup(self, stream: TaskStream) -> None:
        """Once, before the first task (e.g. fit the selector's reference autoencoder)."""

    def begin_task(self, index: int, task: Task) -> None:
        """Before training task `index`."""

    def end_task(self, index: int, task: Task, train_features: torch.Tensor | None = None) -> None:
        """After training task `index` (freezing, weight ensembles, selector fit)."""

    # --- training --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def trainable_parameters(self, index: int) -> list[nn.Parameter]:
        """Parameters the optimiser updates while training task `index` (nothing else may change)."""

    @abc.abstractmethod
    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, index: int, task: Task) -> torch.Tensor:
        """Loss of one batch; `images` are frozen-prefix features (see Learner.uses_prefix) or pixels."""

    # --- evaluation ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def predict(
        self,
        images: torch.Tensor,
        dataset: int,
        stream: TaskStream,
        learned: int,
        selector_features: torch.Tensor | None = None,
    ) -> Prediction:
        """Logits over the label space of `dataset` (see label_space) after `learned` tasks (0 = zero-shot row)."""

    def uses_selector(self) -> bool:
        return False

    # --- helpers shared by every method ----------------------------------------------------------------------
    def eval_classifier(
        self, classnames: Sequence[str], templates: Sequence[str], key: tuple, route: int | None = None
    ) -> torch.Tensor:
        """Normalised class embeddings averaged over all templates, cached per (key, route) while weights are fixed."""
        cache_key = (*key, route)
        if cache_key not in self._classifiers:
            with torch.no_grad():
                self._classifiers[cache_key] = text_classifier(self.model, list(classnames), list(templates), task=route)
        return self._classifiers[cache_key]

    def label_space(self, stream: TaskStream, dataset: int, learned: int) -> tuple[tuple, Sequence[str], Sequence[str]]:
        """(cache key, class names, templates) a test image of `dataset` is classified among.

        MTIL: the dataset's own classes. CIL: every class seen so far (at the zero-shot row: up to that step)."""
        task = stream.tasks[dataset]
        if stream.kind == "cil":
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

    def invalidate_classifiers(self) -> None:
        """Call whenever weights that the text tower uses change."""
        self._classifiers.clear()

    @abc.abstractmethod
    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (safetensors) and JSON state that fully restore this learner between steps (never the frozen
        backbone's own weights: they are reloaded from the backbone config)."""

    @abc.abstractmethod
    def restore_from_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Inverse of state_for_checkpoint on a freshly built learner."""

    # --- selector hooks (methods that route by DDAS override these) ------------------------------------------
    def reference_dataset(self):
        return None

    def fit_reference(self, features: torch.Tensor) -> None:
        raise NotImplementedError

    def selector_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True) -> Learner:
        # nn.Module.train recurses into the model, whose backbone keeps its own layers in eval mode.
        return super().train(mode)
