"""WiSE-FT (Wortsman et al.) in the continual setting: fine-tune each task, then replace the trained towers'
weights by (1 - α)·θ_zero-shot + α·θ_fine-tuned with α = baselines.wise_alpha (the next task starts from there).

θ_zero-shot is the pretrained backbone, snapshotted when the learner is built; it is rebuilt from the backbone
config on every run, so checkpoints never hold it.
"""

from __future__ import annotations

import torch

from moecl.backbone.base import Backbone
from moecl.batches import DataAccess
from moecl.config import RunConfig
from moecl.data.tasks import Task
from moecl.methods.finetune import FinetuneLearner


class WiseFTLearner(FinetuneLearner):
    name = "wise_ft"

    def __init__(self, backbone: Backbone, cfg: RunConfig):
        super().__init__(backbone, cfg)
        self.zero_shot_weights = self.weights.snapshot()

    def interpolate(self, alpha: float) -> None:
        """θ ← (1 - α)·θ_zero-shot + α·θ (α = 0: exactly zero-shot, α = 1: exactly unchanged)."""
        with torch.no_grad():
            for n, p in self.weights.params.items():
                p.copy_((1.0 - alpha) * self.zero_shot_weights[n] + alpha * p)

    def tensor_state(self) -> list[dict]:
        return [*super().tensor_state(), self.zero_shot_weights]

    def end_task(self, index: int, task: Task, data: DataAccess | None = None) -> None:
        self.interpolate(self.cfg.baselines.wise_alpha)
        super().end_task(index, task, data)
