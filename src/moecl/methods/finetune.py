"""Continual fine-tuning: the image tower (and the text tower with baselines.finetune_text) trained task after task.

The classifier of a task is its class prompts with the first template; the loss is CE with the run's label
smoothing. LwF, WiSE-FT and ZSCL subclass this learner and only add hooks (no second training loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moecl.backbone.base import Backbone
from moecl.batches import Batch, DataAccess
from moecl.config import RunConfig
from moecl.data.tasks import Task
from moecl.methods.common import BaselineLearner, task_prompts


class FinetuneLearner(BaselineLearner):
    name = "finetune"

    def __init__(self, backbone: Backbone, cfg: RunConfig):
        towers = ("image", "text") if cfg.baselines.finetune_text else ("image",)
        super().__init__(backbone, cfg, towers)
        self._tokens: dict[int, dict[str, torch.Tensor]] = {}
        self._fixed_text: dict[int, torch.Tensor] = {}  # per task, when the text tower is frozen
        self.task_index = -1  # task being trained (-1: none yet)
        self.step = 0  # optimiser steps done in that task (the engine's count, at_step)

    # --- hooks for the subclasses ----------------------------------------------------------------------------
    def on_new_task(self, index: int, task: Task) -> None:
        """Once per task, before its first step (not again when a run resumes mid-task)."""

    def before_step(self, index: int) -> None:
        """At the start of every training batch, with the weights after `self.step` optimiser steps."""

    def regularizer(self, images: torch.Tensor, logits: torch.Tensor, index: int, task: Task) -> torch.Tensor | None:
        """A term added to the CE loss of the batch (None: plain fine-tuning)."""
        return None

    # --- Learner ---------------------------------------------------------------------------------------------
    def begin_task(self, index: int, task: Task) -> None:
        if index != self.task_index:  # idempotent: a mid-task resume has restored task_index and step already
            self.task_index, self.step = index, 0
            self.on_new_task(index, task)
        self._tokens[index] = self.placement.put(self.model.tokenize(task_prompts(task.classnames, task.templates)))

    def trainable_parameters(self, index: int) -> list[nn.Parameter]:
        return self.weights.unfreeze()

    def text_embeddings(self, index: int) -> torch.Tensor:
        """Normalised prompt embeddings of task `index`'s classes (with grad only when the text tower trains)."""
        if self.trains_text:
            return self.model.encode_text(self._tokens[index])
        if index not in self._fixed_text:
            with torch.no_grad():
                self._fixed_text[index] = self.model.encode_text(self._tokens[index])
        return self._fixed_text[index]

    def task_logits(self, images: torch.Tensor, index: int) -> torch.Tensor:
        """Logits of frozen-prefix features over task `index`'s classes under the current weights."""
        return self.model.logit_scale * self.model.image_suffix(images) @ self.text_embeddings(index).t()

    def tensor_state(self) -> list[dict]:
        return [*super().tensor_state(), self._tokens, self._fixed_text]

    def at_step(self, index: int, steps_done: int) -> None:
        self.step = steps_done

    def training_loss(self, batch: Batch, index: int, task: Task) -> torch.Tensor:
        self.before_step(index)
        logits = self.task_logits(batch.prefix, index)
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=self.cfg.optim.label_smoothing)
        extra = self.regularizer(batch.prefix, logits, index, task)
        return loss if extra is None else loss + extra

    def end_task(self, index: int, task: Task, data: DataAccess | None = None) -> None:
        self.weights_changed()

    # --- checkpoints -----------------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, state = super().state_for_checkpoint()
        state.update(task_index=self.task_index, step=self.step)
        return tensors, state

    def restore_from_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        super().restore_from_checkpoint(tensors, state)
        self.task_index, self.step = int(state["task_index"]), int(state["step"])
        self._fixed_text.clear()
