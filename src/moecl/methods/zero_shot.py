"""Zero-shot baseline: the untouched backbone evaluated after every task (every row equals the zero-shot row)."""

from __future__ import annotations

import torch
from torch import nn

from moecl.batches import Batch
from moecl.data.tasks import Task
from moecl.methods.common import BaselineLearner


class ZeroShotLearner(BaselineLearner):
    name = "zero_shot"

    def trainable_parameters(self, index: int) -> list[nn.Parameter]:
        return []  # the engine skips training entirely

    def training_loss(self, batch: Batch, index: int, task: Task) -> torch.Tensor:
        raise RuntimeError("zero_shot has nothing to train; the engine must not call training_loss")
