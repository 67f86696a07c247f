"""Shared pieces of the baselines (zero_shot, finetune, lwf, wise_ft, zscl): they all wrap a bare Backbone.

- TowerWeights: the named backbone parameters a baseline trains, with snapshots (plain tensors) and loads.
- call_with: run a backbone method under other weights via torch.func.functional_call (no module deep copies).
- distill_kl: the temperature-scaled KL used by LwF and ZSCL.
- BaselineLearner: prediction over Learner.label_space with all templates, and checkpoints of the trained weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from moecl.backbone.base import Backbone
from moecl.batches import Batch
from moecl.checkpoint import prefixed
from moecl.config import RunConfig
from moecl.data.tasks import TaskStream
from moecl.methods.base import Learner, Prediction
from moecl.params import ParameterParts

Weights = dict[str, torch.Tensor]


class TowerWeights:
    """Parameters of `towers` keyed by their name in backbone.named_parameters() (stable across rebuilds)."""

    def __init__(self, backbone: Backbone, towers: Sequence[str]):
        names = {id(p): n for n, p in backbone.named_parameters()}
        self.towers = tuple(towers)
        self.params: dict[str, nn.Parameter] = {}
        for tower in self.towers:
            for p in backbone.tower_parameters(tower):
                self.params[names[id(p)]] = p

    def __len__(self) -> int:
        return len(self.params)

    def unfreeze(self) -> list[nn.Parameter]:
        for p in self.params.values():
            p.requires_grad_(True)
        return list(self.params.values())

    def snapshot(self) -> Weights:
        """Detached copies of the current values (what a previous / zero-shot / ensemble model is kept as)."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    def load(self, weights: Weights, what: str = "weights") -> None:
        missing = sorted(set(self.params) - set(weights))
        if missing:
            raise ValueError(f"{what}: missing tensors for {missing[:3]} ({len(missing)} in all)")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])


class _Bound(nn.Module):
    """Lets functional_call run any backbone method, not only forward."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, method: str, *args):
        return getattr(self.backbone, method)(*args)


def call_with(backbone: Backbone, weights: Weights, method: str, *args):
    """backbone.<method>(*args) computed with `weights` in place of the named parameters (others unchanged)."""
    return functional_call(_Bound(backbone), {f"backbone.{n}": t for n, t in weights.items()}, (method, *args))


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T², averaged over rows (Hinton's distillation; exactly 0
    when the logits are equal, same gradient as ZSCL's soft cross-entropy)."""
    t = float(temperature)
    log_s = F.log_softmax(student / t, dim=-1)
    log_t = F.log_softmax(teacher.detach() / t, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


def task_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Training prompts: the first template only (method.md / the reference)."""
    return [templates[0].format(c) for c in classnames]


class BaselineLearner(Learner):
    """A bare backbone whose `towers` ("image", "text") may be trained; the rest of the backbone stays frozen.

    Prediction: cosine logits against the all-templates text classifier of Learner.label_space (MTIL: the
    dataset's classes, plus the task-agnostic union view; CIL: every class seen so far)."""

    def __init__(self, backbone: Backbone, cfg: RunConfig, towers: Sequence[str] = ()):
        super().__init__(backbone.freeze(), cfg)
        self.weights = TowerWeights(backbone, towers)

    @classmethod
    def from_config(cls, backbone: Backbone, cfg: RunConfig, stream: TaskStream | None = None) -> BaselineLearner:
        return cls(backbone, cfg)

    @classmethod
    def parts_after(cls, backbone: Backbone, cfg: RunConfig, num_tasks: int) -> ParameterParts:
        return cls(backbone, cfg).parameter_parts()  # the trained towers are the same after any number of tasks

    def parameter_parts(self) -> ParameterParts:
        return ParameterParts(self.model, tuple(self.weights.params.values()))

    @property
    def backbone(self) -> Backbone:
        return self.model

    @property
    def trains_text(self) -> bool:
        return "text" in self.weights.towers

    def weights_changed(self) -> None:
        """Drop cached evaluation classifiers if the text tower's weights may have moved."""
        if self.trains_text:
            self.invalidate_classifiers()

    # --- evaluation ------------------------------------------------------------------------------------------
    def predict(self, batch: Batch, stream: TaskStream, learned: int) -> Prediction:
        dataset = batch.dataset
        key, classnames, templates = self.label_space(stream, dataset, learned)
        image = self.model.image_suffix(batch.prefix)
        scale = self.model.logit_scale
        logits = scale * image @ self.eval_classifier(classnames, templates, key).t()
        if stream.class_incremental or learned == 0:
            return Prediction(logits)
        union, offset = self.union_space(stream, dataset, learned)
        union_logits = scale * image @ self.union_classifier(stream, union, None).t()
        return Prediction(logits, None, union_logits, offset)

    # --- checkpoints: only the trained towers' weights (the frozen rest is rebuilt from the backbone config) ---
    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"tower.{n}": t for n, t in self.weights.snapshot().items()}
        return tensors, {"towers": list(self.weights.towers)}

    def restore_from_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        if list(state.get("towers", [])) != list(self.weights.towers):
            raise ValueError(
                f"checkpoint: trained towers {state.get('towers')} differ from this run's {list(self.weights.towers)}"
                " (baselines.finetune_text changed?); resume with the config the run was started with"
            )
        self.weights.load(prefixed(tensors, "tower."), "checkpoint tower weights")
        self.invalidate_classifiers()
