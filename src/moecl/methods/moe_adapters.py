"""MoE-Adapters (CVPR 2024): per-task routers over a shared expert pool, activate-freeze, DDAS routing at test time."""

from __future__ import annotations

import torch

from moecl.config import RunConfig
from moecl.data.tasks import Task, TaskStream
from moecl.methods.base import Learner, Prediction
from moecl.moe.model import MoEAdapterModel

ZERO_SHOT = -1


class MoEAdaptersLearner(Learner):
    name = "moe_adapters"

    def __init__(self, model: MoEAdapterModel, cfg: RunConfig, reference=None):
        super().__init__(model, cfg)
        self._reference = reference  # ImageDataset of reference images for DDAS (None: no reference AE)
        self._tokens: dict[int, dict[str, torch.Tensor]] = {}
        self.selector = None  # AutoSelector (DDAS) when enabled
        self.features = None
        if cfg.selector.enabled and not cfg.moe.single_router:
            from moecl.selector.ddas import AutoSelector
            from moecl.selector.features import build_feature_extractor

            self.features = build_feature_extractor(cfg.selector.features, model.backbone)
            self.selector = AutoSelector(cfg.selector, self.features.dim)

    @classmethod
    def from_config(cls, backbone, cfg: RunConfig, stream: TaskStream | None = None) -> MoEAdaptersLearner:
        reference = None
        if cfg.selector.enabled and cfg.selector.reference and not cfg.moe.single_router:
            from moecl.data.tasks import reference_dataset, stream_data_root

            root = stream_data_root(cfg.stream)  # the quickstart reads the bundled reference images too
            reference = reference_dataset(cfg.selector.reference, root, cfg.selector.reference_max_images)
        return cls(MoEAdapterModel(backbone, cfg.moe), cfg, reference)

    # routing: with a single router (CIL) every step trains and uses router 0
    def _router(self, index: int) -> int:
        return 0 if self.cfg.moe.single_router else index

    def uses_selector(self) -> bool:
        return self.selector is not None

    def reference_dataset(self):
        return self._reference

    def fit_reference(self, features: torch.Tensor) -> None:
        self.selector.fit_reference(features)

    def selector_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.model.task(None):
            return self.features(pixels)

    def begin_task(self, index: int, task: Task) -> None:
        # Idempotent: a resumed run restores the routers first, then replays begin_task.
        while self.model.num_tasks <= self._router(index):
            self.model.add_task()
        prompts = [task.templates[0].format(c) for c in task.classnames]  # training: the first template only
        self._tokens[index] = self.model.tokenize(prompts)
        self.invalidate_classifiers()

    def trainable_parameters(self, index: int) -> list[torch.nn.Parameter]:
        return self.model.trainable_parameters(self._router(index))

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, index: int, task: Task) -> torch.Tensor:
        route = self._router(index)
        text = self.model.encode_text(self._tokens[index], task=route)
        image = self.model.image_suffix(images, task=route)
        logits = self.model.logit_scale * image @ text.t()
        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=self.cfg.optim.label_smoothing)
        if self.cfg.moe.load_balance_weight > 0:
            loss = loss + self.cfg.moe.load_balance_weight * self.model.aux_loss()
        return loss

    def end_task(self, index: int, task: Task, train_features: torch.Tensor | None = None) -> None:
        if self.cfg.moe.freeze_per_task > 0 and not self.cfg.moe.single_router:
            self.model.end_task()
        if self.selector is not None and train_features is not None:
            self.selector.fit_task(train_features)
        self.invalidate_classifiers()

    def route(self, dataset: int, learned: int, n: int, selector_features: torch.Tensor | None) -> torch.Tensor:
        """Task index per image: DDAS when enabled, else the true task if learned, zero-shot otherwise."""
        if learned == 0:
            return torch.full((n,), ZERO_SHOT, dtype=torch.long)
        if self.cfg.moe.single_router:
            return torch.zeros(n, dtype=torch.long)
        if self.selector is not None and selector_features is not None:
            return self.selector.select(selector_features).long()
        return torch.full((n,), dataset if dataset < learned else ZERO_SHOT, dtype=torch.long)

    def predict(
        self,
        images: torch.Tensor,
        dataset: int,
        stream: TaskStream,
        learned: int,
        selector_features: torch.Tensor | None = None,
    ) -> Prediction:
        routed = self.route(dataset, learned, len(images), selector_features)
        key, classnames, templates = self.label_space(stream, dataset, learned)
        agnostic = stream.kind == "mtil" and learned > 0
        union, offset = self.union_space(stream, dataset, learned) if agnostic else ([], 0)
        # One forward for the whole mixed batch: rows routed to -1 pass through the untouched backbone.
        image = self.model.image_suffix(images, task=routed)
        logits = image.new_zeros(len(images), len(classnames))
        union_logits = image.new_zeros(len(images), sum(len(stream.tasks[k].classnames) for k in union))
        for r in routed.unique().tolist():
            rows = routed == r
            route = None if r == ZERO_SHOT else r
            scale = self.model.logit_scale
            logits[rows] = scale * image[rows] @ self.eval_classifier(classnames, templates, key, route).t()
            if agnostic:
                union_logits[rows] = scale * image[rows] @ self.union_classifier(stream, union, route).t()
        return Prediction(
            logits,
            routed if self.selector is not None else None,
            union_logits if agnostic else None,
            offset,
        )

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"adapters.{k}": v.detach().clone() for k, v in self.model.adapters.state_dict().items()}
        state = {"num_tasks": self.model.num_tasks, "selector_tasks": 0}
        if self.selector is not None:
            tensors.update({f"selector.{k}": v.detach().clone() for k, v in self.selector.state_dict().items()})
            state["selector_tasks"] = self.selector.num_tasks
            state["selector_extra"] = self.selector.extra_state() if hasattr(self.selector, "extra_state") else None
        return tensors, state

    def restore_from_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        while self.model.num_tasks < state["num_tasks"]:
            self.model.add_task()
        self.model.adapters.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("adapters.")})
        if self.selector is not None:
            sel = {k[9:]: v for k, v in tensors.items() if k.startswith("selector.")}
            self.selector.load_state_dict(sel)
        self.invalidate_classifiers()
