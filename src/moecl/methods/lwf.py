"""LwF (Li & Hoiem): fine-tuning plus distillation of the previous model's logits on the new task's data.

The previous model is the one after the previous task (for the first task: the pretrained backbone, as in the
MTIL baselines of ZSCL). It is kept as a tensor snapshot of the trained towers and evaluated with
torch.func.functional_call, so no module is deep-copied. The term is KL at temperature T between the previous and
the current model's logits over the current task's classes, times T², weighted by baselines.lwf_weight.
"""

from __future__ import annotations

import torch

from moecl.backbone.base import Backbone
from moecl.checkpoint import prefixed
from moecl.config import RunConfig
from moecl.data.tasks import Task
from moecl.methods.common import Weights, call_with, distill_kl
from moecl.methods.finetune import FinetuneLearner


class LwFLearner(FinetuneLearner):
    name = "lwf"

    def __init__(self, backbone: Backbone, cfg: RunConfig):
        super().__init__(backbone, cfg)
        self.previous: Weights | None = None

    def on_new_task(self, index: int, task: Task) -> None:
        self.previous = self.weights.snapshot()

    def previous_logits(self, images: torch.Tensor, index: int) -> torch.Tensor:
        """Task `index`'s logits of the model after the previous task (no grad)."""
        with torch.no_grad():
            image = call_with(self.model, self.previous, "image_suffix", images)
            if self.trains_text:
                text = call_with(self.model, self.previous, "encode_text", self._tokens[index])
            else:
                text = self.text_embeddings(index)  # frozen text tower: the previous model's text is the current one
            return self.model.logit_scale * image @ text.t()

    def lwf_loss(self, images: torch.Tensor, logits: torch.Tensor, index: int) -> torch.Tensor:
        """The distillation term (unweighted) for current logits `logits` of the frozen-prefix batch `images`."""
        return distill_kl(logits, self.previous_logits(images, index), self.cfg.baselines.lwf_temperature)

    def regularizer(self, images: torch.Tensor, logits: torch.Tensor, index: int, task: Task) -> torch.Tensor | None:
        weight = self.cfg.baselines.lwf_weight
        return weight * self.lwf_loss(images, logits, index) if weight else None

    def tensor_state(self) -> list[dict]:
        return [*super().tensor_state(), *([self.previous] if self.previous is not None else [])]

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, state = super().state_for_checkpoint()
        if self.previous is not None:
            tensors.update({f"previous.{n}": t for n, t in self.previous.items()})
        state["has_previous"] = self.previous is not None
        return tensors, state

    def restore_from_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        super().restore_from_checkpoint(tensors, state)
        self.previous = prefixed(tensors, "previous.") if state.get("has_previous") else None
