"""ZSCL (Zheng et al., ICCV 2023): fine-tuning + feature-space distillation from the initial (zero-shot) model on
reference images, + a weight ensemble (WE).

Distillation: every step draws a reference batch (cfg.optim.batch_size images of baselines.zscl_reference, eval
transform) deterministically from (seed, task, step). With the reference classes' prompts (first template of the
reference dataset) as texts, the current and the initial model each give image-to-text logits; the term is
KL(initial || current) at baselines.zscl_temperature over texts (image → text) plus the same over the batch's
images per text (text → image), times T², weighted by baselines.zscl_weight. The initial model is a tensor snapshot
of the pretrained towers run through functional_call (its reference-text embeddings are computed once; its image
embeddings per batch, so a resumed run replays bit for bit).

Weight ensemble: within each task, the running mean of the trained towers' weights taken at steps 0, N, 2N, ...
and at the end of the task (N = `we_every`, default 100 as in ZSCL's avg_freq); at the end of the task the weights
are replaced by that mean, and the next task starts from it.
"""

from __future__ import annotations

import torch

from moecl.backbone.base import Backbone
from moecl.batches import DataAccess
from moecl.checkpoint import prefixed
from moecl.config import RunConfig
from moecl.data.folder import ImageDataset
from moecl.data.tasks import Task, TaskStream
from moecl.data.templates import templates_for
from moecl.methods.common import Weights, call_with, distill_kl, task_prompts
from moecl.methods.finetune import FinetuneLearner
from moecl.params import ParameterParts

WE_EVERY = 100  # steps between weight-ensemble snapshots
TEXT_CHUNK = 256  # reference prompts encoded per forward
REFERENCE_STREAM = 0x25C1  # keeps reference draws independent of the engine's (seed, task, step) augmentation


class ZSCLLearner(FinetuneLearner):
    name = "zscl"

    def __init__(self, backbone: Backbone, cfg: RunConfig, reference: ImageDataset, we_every: int = WE_EVERY):
        super().__init__(backbone, cfg)
        if len(reference) == 0 or not reference.classnames:
            raise ValueError(f"baselines.zscl_reference: reference data '{reference.name}' has no images")
        if we_every < 1:
            raise ValueError(f"zscl: we_every must be >= 1, got {we_every}")
        self.reference = reference
        self.we_every = we_every
        self.initial: Weights = self.weights.snapshot()  # the zero-shot model; rebuilt with the backbone, not saved
        prompts = task_prompts(reference.classnames, templates_for(reference.name))
        chunks = range(0, len(prompts), TEXT_CHUNK)
        self._ref_tokens = {s: self.model.tokenize(prompts[s : s + TEXT_CHUNK]) for s in chunks}  # by first prompt
        self._ref_text_initial: dict[str, torch.Tensor] = {}  # "text": computed once, on first use
        self.ensemble: Weights | None = None
        self.ensemble_count = 0
        self.ensemble_step = -1  # step of the last snapshot added (no double counting at the task's end)

    @classmethod
    def from_config(cls, backbone: Backbone, cfg: RunConfig, stream: TaskStream | None = None) -> ZSCLLearner:
        from moecl.data.tasks import reference_dataset, stream_data_root

        reference = reference_dataset(cfg.baselines.zscl_reference, stream_data_root(cfg.stream), seed=cfg.seed)
        return cls(backbone, cfg, reference)

    @classmethod
    def parts_after(cls, backbone: Backbone, cfg: RunConfig, num_tasks: int) -> ParameterParts:
        # Its reference data (read by from_config) holds no parameters: it trains what fine-tuning trains.
        return FinetuneLearner(backbone, cfg).parameter_parts()

    def tensor_state(self) -> list[dict]:
        stores = [*super().tensor_state(), self.initial, self._ref_tokens, self._ref_text_initial]
        return stores + ([self.ensemble] if self.ensemble is not None else [])

    # --- weight ensemble -------------------------------------------------------------------------------------
    def on_new_task(self, index: int, task: Task) -> None:
        self.ensemble, self.ensemble_count, self.ensemble_step = None, 0, -1

    def add_to_ensemble(self) -> None:
        """Fold the current weights into the running mean (once per step)."""
        if self.ensemble_step == self.step:
            return
        current = self.weights.snapshot()
        if self.ensemble is None:
            self.ensemble = current
        else:
            n = self.ensemble_count
            for name, t in self.ensemble.items():
                t.mul_(n).add_(current[name]).div_(n + 1)
        self.ensemble_count += 1
        self.ensemble_step = self.step

    def before_step(self, index: int) -> None:
        if self.step % self.we_every == 0:
            self.add_to_ensemble()

    def end_task(self, index: int, task: Task, data: DataAccess | None = None) -> None:
        self.add_to_ensemble()
        self.weights.load(self.ensemble, "zscl weight ensemble")
        super().end_task(index, task, data)

    # --- distillation ----------------------------------------------------------------------------------------
    def reference_indices(self, index: int, step: int) -> list[int]:
        """The reference batch of (seed, task, step): a pure function, so resumed runs draw the same images."""
        # ints only: tuple-of-int hashes are stable across processes (str hashes are salted)
        seed = hash((self.cfg.seed, index, step, REFERENCE_STREAM)) & 0x7FFF_FFFF_FFFF_FFFF
        gen = torch.Generator().manual_seed(seed)
        n = len(self.reference)
        return torch.randperm(n, generator=gen)[: min(self.cfg.optim.batch_size, n)].tolist()

    def _reference_prefix(self, indices: list[int]) -> torch.Tensor | None:
        transform = self.model.image_transform(False)
        images = (self.reference[i][0] for i in indices)
        pixels = [transform(img) for img in images if img is not None]  # None: unreadable, skip-mode reference
        if not pixels:
            return None
        with torch.no_grad():
            return self.model.image_prefix(self.placement.put(torch.stack(pixels)))

    def _initial_text(self) -> torch.Tensor:
        if "text" not in self._ref_text_initial:
            with torch.no_grad():
                parts = [call_with(self.model, self.initial, "encode_text", t) for t in self._ref_tokens.values()]
            self._ref_text_initial["text"] = torch.cat(parts)
        return self._ref_text_initial["text"]

    def zscl_loss(self, index: int, step: int) -> torch.Tensor:
        """The distillation term (unweighted) on reference batch (index, step) under the current weights."""
        prefix = self._reference_prefix(self.reference_indices(index, step))
        if prefix is None:
            return torch.zeros((), device=self.device)
        scale = self.model.logit_scale
        with torch.no_grad():  # recomputed per batch: a per-image cache would make results depend on batch history
            teacher = scale * call_with(self.model, self.initial, "image_suffix", prefix) @ self._initial_text().t()
        if self.trains_text:
            text = torch.cat([self.model.encode_text(t) for t in self._ref_tokens.values()])
        else:
            text = self._initial_text()  # frozen text tower: the current texts are the initial ones
        student = scale * self.model.image_suffix(prefix) @ text.t()
        t = self.cfg.baselines.zscl_temperature
        return distill_kl(student, teacher, t) + distill_kl(student.t(), teacher.t(), t)

    def regularizer(self, images: torch.Tensor, logits: torch.Tensor, index: int, task: Task) -> torch.Tensor | None:
        weight = self.cfg.baselines.zscl_weight
        return weight * self.zscl_loss(index, self.step) if weight else None

    # --- checkpoints -----------------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, state = super().state_for_checkpoint()
        if self.ensemble is not None:
            tensors.update({f"ensemble.{n}": t.clone() for n, t in self.ensemble.items()})
        state.update(ensemble_count=self.ensemble_count, ensemble_step=self.ensemble_step)
        return tensors, state

    def restore_from_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        super().restore_from_checkpoint(tensors, state)
        self.ensemble_count = int(state.get("ensemble_count", 0))
        self.ensemble_step = int(state.get("ensemble_step", -1))
        ensemble = prefixed(tensors, "ensemble.")
        self.ensemble = {n: t.clone() for n, t in ensemble.items()} if self.ensemble_count else None
