"""MoE-Adapters (CVPR 2024): per-task routers over a shared expert pool, activate-freeze, DDAS routing at test time.

Everything DDAS needs happens here, through the engine's DataAccess: `setup` fits the reference autoencoder on
the reference images, `end_task` fits the task's autoencoder on its training images (`DatasetFeatures`: the fit
reads the features of just the images its schedule names, held or streamed, never a whole split), `predict` routes
every test image and records where each went (per evaluation row, so a row evaluated again replaces its counts).
`Predictor` (moecl predict) builds this learner from a finished run and uses the same `route`.

Evaluation reuses what cannot change (data.reuse_eval): the zero-shot branch is the untouched backbone, so an
image's zero-shot embedding is the one the zero-shot row computed; a finished task's autoencoder never changes, so
an image's DDAS error under it is computed once (and backbone DDAS features, embedding-sized, once per run; the
paper's 43,264 AlexNet values are computed again each row instead of kept). All are small per image (an embedding,
T+1 errors), kept by image key, and always computed the same way (over the image's whole evaluation batch), so results are identical with
reuse on or off, and after a resume that starts with nothing kept.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moecl.batches import Batch, DataAccess, evaluation_seed, step_seed
from moecl.branches import ZERO_SHOT
from moecl.checkpoint import prefixed
from moecl.config import RunConfig
from moecl.data.tasks import Task, TaskStream
from moecl.methods.base import Learner, Prediction
from moecl.moe.model import MoEAdapterModel
from moecl.params import ParameterParts
from moecl.selector.base import TaskSelector, build_selector, load_selector, selector_class
from moecl.selector.ddas import branch_name
from moecl.selector.features import FeatureExtractor, PixelFeatures

if TYPE_CHECKING:
    from moecl.data.folder import ImageDataset

ADAPTERS_DIR = "adapters"
SELECTOR_DIR = "selector"


class MoEAdaptersLearner(Learner):
    name = "moe_adapters"

    def __init__(
        self, model: MoEAdapterModel, cfg: RunConfig, reference=None, features: FeatureExtractor | None = None
    ):
        """`features`: the selector's feature extractor to use instead of building cfg.selector.features (a scale
        model's randomly initialised AlexNet, say); it must produce what cfg.selector.features names."""
        super().__init__(model, cfg)
        self._reference = reference  # ImageDataset of reference images for DDAS (None: no reference AE)
        self._tokens: dict[int, dict[str, torch.Tensor]] = {}
        self.selector: TaskSelector | None = None  # cfg.selector.kind's selector (DDAS, prototype) when enabled
        self.features = None
        # What evaluation reuses, by image key (host copies; the key makes it impossible to pair them with another
        # image): zero-shot embeddings, and DDAS errors [reference, task 0, task 1, ...] of the AEs trained so far.
        # (an image read through the training transform, optim.eval_augment, is another crop in every row)
        self.reuse = cfg.data.reuse_eval and not cfg.optim.eval_augment
        self._zero_shot: dict[str, torch.Tensor] = {}
        self._errors: dict[str, torch.Tensor] = {}
        self._features_kept: dict[str, torch.Tensor] = {}  # backbone DDAS features (embedding-sized)
        # where the test images went: {learned: {dataset: {branch: count}}}, branch -1 = zero-shot
        self.routing: dict[int, dict[int, dict[int, int]]] = {}
        self._task_usage: dict[str, list[int]] = {}  # expert usage per block of the last task (before its freeze)
        # the selector's own cost on this process (report.md): seconds fitting it (reference and tasks), seconds
        # selecting test images' routes (their selector features included) and how many; kept in checkpoints
        self.selector_time = {"fit_s": 0.0, "select_s": 0.0, "selected": 0}
        if cfg.uses_ddas:
            from moecl.selector.features import build_feature_extractor

            if features is not None and features.name != cfg.selector.features:
                raise ValueError(f"features {features.name!r} given for selector.features {cfg.selector.features!r}")
            squash = selector_class(cfg.selector.kind).SQUASHED_FEATURES
            if features is None:
                features = build_feature_extractor(cfg.selector.features, model.backbone, squash=squash)
            self.features = features
            self.selector = build_selector(cfg.selector, self.features.dim)

    @classmethod
    def from_config(cls, backbone, cfg: RunConfig, stream: TaskStream | None = None) -> MoEAdaptersLearner:
        reference = None
        if cfg.uses_ddas and selector_class(cfg.selector.kind).fits_reference(cfg.selector):
            from moecl.data.tasks import stream_data_root
            from moecl.selector.reference import reference_images

            root = stream_data_root(cfg.stream)  # the quickstart reads the bundled reference images too
            reference = reference_images(cfg.selector, root, cfg.seed)
        return cls(MoEAdapterModel(backbone, cfg.moe), cfg, reference)

    @classmethod
    def parts_after(cls, backbone, cfg: RunConfig, num_tasks: int) -> ParameterParts:
        model = MoEAdapterModel(backbone, cfg.moe)
        for _ in range(num_tasks):
            model.add_task()  # one router in all with moe.single_router
        selector = None
        if cfg.uses_ddas:
            from moecl.selector.features import feature_dim

            selector = build_selector(cfg.selector, feature_dim(cfg.selector.features, backbone))
            selector.allocate(num_tasks, reference=selector.fits_reference(cfg.selector))
        return ParameterParts(model, tuple(model.adapters.parameters()), selector)

    @property
    def backbone(self):
        return self.model.backbone

    def parameter_parts(self) -> ParameterParts:
        return ParameterParts(self.model, tuple(self.model.adapters.parameters()), self.selector)

    @classmethod
    def from_outputs(cls, run: Path, cfg: RunConfig, backbone) -> MoEAdaptersLearner:
        """The learner of a finished run, from what `save_outputs` wrote (adapters/, selector/) onto `backbone`."""
        learner = cls(MoEAdapterModel(backbone, cfg.moe), cfg)
        learner.model.load_adapters(run / ADAPTERS_DIR)
        learner.selector = load_selector(run / SELECTOR_DIR) if (run / SELECTOR_DIR).exists() else None
        return learner

    def tensor_state(self) -> list[dict[str, Any]]:
        return [*super().tensor_state(), self._tokens]

    # routing: with a single router (CIL) every step trains and uses router 0
    def _router(self, index: int) -> int:
        return 0 if self.cfg.moe.single_router else index

    # --- task boundaries -------------------------------------------------------------------------------------
    def setup(self, stream: TaskStream, data: DataAccess | None = None) -> None:
        if self.selector is not None and self.cfg.selector.untrained_in_argmin:
            # the official code's layout: an autoencoder slot and a (zero-initialised) router for every task of the
            # stream from the start, so an untrained slot that wins the argmin has a router to send its images to
            self.selector.reserve_slots(len(stream))
            while self.model.num_tasks < len(stream):
                self.model.add_task()
        if self.selector is not None and self._reference is not None:
            ref = self._reference
            start = time.perf_counter()
            self.selector.fit_reference(self._features(data, ref, ref.name), lr_epoch_rows(ref))
            self.selector_time["fit_s"] += time.perf_counter() - start

    def begin_task(self, index: int, task: Task) -> None:
        # Idempotent: a resumed run restores the routers first, then replays begin_task.
        while self.model.num_tasks <= self._router(index):
            self.model.add_task()
        prompts = [task.templates[0].format(c) for c in task.classnames]  # training: the first template only
        self._tokens[index] = self.placement.put(self.model.tokenize(prompts))
        self.invalidate_classifiers(keep_zero_shot=True)

    def end_task(self, index: int, task: Task, data: DataAccess | None = None) -> None:
        # activate-freeze resets the counts: keep them for task_statistics
        self._task_usage = {key: a.pool.usage.tolist() for key, a in self.model.adapters.items()}
        if self.cfg.moe.freeze_per_task > 0 and not self.cfg.moe.single_router:
            self.model.end_task()
        if self.selector is not None:
            features = self._features(data, task.train, f"{task.name}/train")
            labels = torch.tensor(task.train.labels, dtype=torch.long)
            start = time.perf_counter()
            self.selector.fit_task(features, lr_epoch_rows=lr_epoch_rows(task.train), labels=labels)
            self.selector_time["fit_s"] += time.perf_counter() - start
        self.invalidate_classifiers(keep_zero_shot=True)

    # --- training --------------------------------------------------------------------------------------------
    def trainable_parameters(self, index: int) -> list[torch.nn.Parameter]:
        return self.model.trainable_parameters(self._router(index))

    def training_loss(self, batch: Batch, index: int, task: Task) -> torch.Tensor:
        route = self._router(index)
        text = self.model.encode_text(self._tokens[index], task=route)
        image = self.model.image_suffix(batch.prefix, task=route)
        logits = self.model.logit_scale * image @ text.t()
        loss = torch.nn.functional.cross_entropy(logits, batch.labels, label_smoothing=self.cfg.optim.label_smoothing)
        if self.cfg.moe.load_balance_weight > 0:
            loss = loss + self.cfg.moe.load_balance_weight * self.model.aux_loss()
        return loss

    # --- DDAS ------------------------------------------------------------------------------------------------
    def eval_needs_pixels(self) -> bool:
        return isinstance(self.features, PixelFeatures)  # AlexNet reads pixels; backbone features the prefix

    @torch.no_grad()
    def selector_features(self, batch: Batch) -> torch.Tensor:
        """Selector features of the batch's images (untouched backbone; fp32 even under autocast: the thresholds
        were calibrated in fp32)."""
        with torch.autocast(self.device.type, enabled=False), self.model.task(None):
            return self.features.of(batch)

    def _features(self, data: DataAccess | None, ds, name: str) -> DatasetFeatures:
        if data is None:
            raise ValueError("MoE-Adapters with DDAS needs the engine's DataAccess to fit its autoencoders")
        return DatasetFeatures(self, data, ds, name)

    def _test_errors(self, batch: Batch) -> torch.Tensor:
        """(B, T+U+1) DDAS errors of the batch's images (selector layout: tasks, untrained slots, the reference),
        computing only the columns of autoencoders trained since the images were last seen (and the untrained
        slots' every time: they stop being untrained)."""
        sel = self.selector
        kept = [self._errors.get(key) for key in batch.keys] if self.reuse else [None] * len(batch)
        have = min(-1 if k is None else len(k) - 1 for k in kept)  # task columns every row has (-1: none at all)
        if have < sel.num_tasks:
            with torch.autocast(self.device.type, enabled=False):  # fp32: the thresholds were calibrated in fp32
                prepared = sel.prepared(self._kept_features(batch))
                first = max(have, 0)
                new = sel.task_errors(prepared, first).cpu()
                ref = sel.reference_errors(prepared).cpu() if have < 0 else None
            kept = [
                torch.cat([old[: 1 + first] if ref is None else ref[n : n + 1], new[n]])
                for n, old in enumerate(kept)
            ]
            if self.reuse:
                self._errors.update(zip(batch.keys, kept, strict=True))
        errors = torch.stack(kept)
        untrained = errors.new_zeros(len(errors), 0)
        if sel.untrained_slots:
            with torch.autocast(self.device.type, enabled=False):
                untrained = sel.untrained_errors(sel.prepared(self._kept_features(batch))).cpu()
        return self.placement.put(torch.cat([errors[:, 1:], untrained, errors[:, :1]], dim=1))

    def _kept_features(self, batch: Batch) -> torch.Tensor:
        """The batch's DDAS features; backbone features are embedding-sized and kept by image key (the next rows
        need them for the next autoencoder), pixel features (AlexNet's 43,264 values) are computed again."""
        keep = self.reuse and not isinstance(self.features, PixelFeatures)
        return self._kept(self._features_kept if keep else None, batch, self.selector_features)[0]

    def _kept(
        self, store: dict[str, torch.Tensor] | None, batch: Batch, compute: Callable[[Batch], torch.Tensor]
    ) -> tuple[torch.Tensor, bool]:
        """Per-image rows of `batch` from `store` (by image key) when it holds them all, else `compute(batch)` over
        the whole batch (always the same computation, so a kept row equals a recomputed one), kept as host copies;
        and whether they were computed. `store` None: nothing is kept."""
        if store is not None and all(key in store for key in batch.keys):
            return self.placement.put(torch.stack([store[key] for key in batch.keys])), False
        rows = compute(batch)
        if store is not None:
            store.update(zip(batch.keys, rows.detach().to("cpu", copy=True), strict=True))
        return rows, True

    def route(self, batch: Batch, learned: int, errors: torch.Tensor | None = None) -> torch.Tensor:
        """Task index per image (ZERO_SHOT: the untouched backbone) after `learned` tasks: DDAS when enabled (on
        precomputed `errors`, or the batch's own), else the batch's dataset if it is learned, zero-shot otherwise."""
        n = len(batch)
        if learned == 0:
            return torch.full((n,), ZERO_SHOT, dtype=torch.long, device=self.device)
        if self.cfg.moe.single_router:
            return torch.zeros(n, dtype=torch.long, device=self.device)
        if self.selector is not None:
            with torch.autocast(self.device.type, enabled=False):
                if errors is not None:
                    return self.selector.decide(errors)
                return self.selector.select(self.selector_features(batch))
        known = batch.dataset is not None and batch.dataset < learned
        return torch.full((n,), batch.dataset if known else ZERO_SHOT, dtype=torch.long, device=self.device)

    def _zero_shot_embeddings(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """(B, D) untouched-backbone embeddings of the whole batch, and the forwards that took (0: all reused)."""
        store = self._zero_shot if self.reuse else None
        image, computed = self._kept(store, batch, lambda b: self.model.image_suffix(b.prefix, task=None))
        return image, len(batch) if computed else 0

    # --- evaluation ------------------------------------------------------------------------------------------
    def begin_evaluation(self, learned: int) -> None:
        self.routing[learned] = {}
        if self.cfg.moe.eval_noise:  # the official CIL code's noisy routers at test time, seeded per row
            self.model.seed_eval_noise(evaluation_seed(self.cfg.seed, learned))

    def eval_routes(self, learned: int, dataset: int) -> list[int | None]:
        """What `route` can send an image of `dataset` to (None: the zero-shot branch)."""
        if learned == 0:
            return [None]
        if self.cfg.moe.single_router:
            return [0]
        if self.selector is not None:
            return [None, *range(learned)]
        return [dataset if dataset < learned else None]

    def predict(self, batch: Batch, stream: TaskStream, learned: int) -> Prediction:
        dataset = batch.dataset
        use_selector = self.selector is not None and learned > 0
        start = time.perf_counter()
        routed = self.route(batch, learned, self._test_errors(batch) if use_selector else None)
        if use_selector:  # (route's result is on the host's clock: the score table came back through .cpu())
            self.selector_time["select_s"] += time.perf_counter() - start
            self.selector_time["selected"] += len(batch)
        key, classnames, templates = self.label_space(stream, dataset, learned)
        agnostic = not stream.class_incremental and learned > 0
        union_tasks, offset = self.union_space(stream, dataset, learned) if agnostic else ([], 0)
        # Rows routed to zero-shot take the untouched backbone's embedding (kept from the zero-shot row); the
        # others get one forward together, each through its own task's router.
        zero = routed == ZERO_SHOT
        forwards = 0
        image = None
        if bool(zero.any()):
            image, forwards = self._zero_shot_embeddings(batch)
        rows = (~zero).nonzero().flatten()
        if len(rows):
            every = len(rows) == len(batch)
            tuned = self.model.image_suffix(batch.prefix if every else batch.prefix[rows], task=routed[rows])
            image = tuned if image is None else image.index_copy(0, rows, tuned.to(image.dtype))
            forwards += len(rows)
        logits = image.new_zeros(len(batch), len(classnames))
        sizes = [len(stream.tasks[k].classnames) for k in union_tasks]
        union_logits = image.new_zeros(len(batch), sum(sizes))
        # selector.agnostic_classes "routed": an image the selector sent to task r is classified among task r's
        # classes only (its block of the union); zero-shot-routed images among the whole union (as are those
        # sent to a task whose classes the union does not hold: an untrained slot, selector.untrained_in_argmin)
        routed_only = self.selector is not None and self.cfg.selector.agnostic_classes == "routed"
        scale = self.model.logit_scale
        for r in routed.unique().tolist():
            rows = routed == r
            route = None if r == ZERO_SHOT else r
            # (cast: under autocast the product's dtype need not be the embeddings')
            logits[rows] = (scale * image[rows] @ self.eval_classifier(classnames, templates, key, route).t()).to(
                logits.dtype
            )
            if agnostic and routed_only and route in union_tasks:  # (an untrained slot's task may not be)
                start = sum(sizes[: union_tasks.index(route)])
                t = stream.tasks[route]
                block = scale * image[rows] @ self.eval_classifier(t.classnames, t.templates, ("task", route), route).t()
                at = rows.nonzero().flatten()
                union_logits[at] = torch.finfo(union_logits.dtype).min
                union_logits[at, start : start + len(t.classnames)] = block.to(union_logits.dtype)
            elif agnostic:
                union = scale * image[rows] @ self.union_classifier(stream, union_tasks, route).t()
                union_logits[rows] = union.to(union_logits.dtype)
        if self.selector is not None and learned > 0:
            self._count(learned, dataset, routed)
        routes = routed if self.selector is not None else None
        return Prediction(logits, routes, union_logits if agnostic else None, offset, forwards)

    def end_evaluation(self, learned: int, stream: TaskStream, sum_over_processes) -> None:
        if self.selector is None or learned == 0:  # the same on every process: the collective is called by all
            return
        # one dense (dataset x branch) table, the same shape on every process; branch -1 (zero-shot) = last column
        n = len(stream.tasks)
        table = torch.zeros(n, n + 1, dtype=torch.long)
        for j, counts in self.routing.get(learned, {}).items():
            for branch, count in counts.items():
                table[j, branch] = count
        table = sum_over_processes(table)
        self.routing[learned] = {
            j: {b: int(table[j, b]) for b in [*range(n), ZERO_SHOT] if table[j, b]} for j in range(n) if table[j].any()
        }

    def _count(self, learned: int, dataset: int, routed: torch.Tensor) -> None:
        row = self.routing.setdefault(learned, {}).setdefault(dataset, {})
        branches, counts = torch.unique(routed, return_counts=True)
        for branch, n in zip(branches.tolist(), counts.tolist(), strict=True):
            row[branch] = row.get(branch, 0) + n

    def metrics(self, stream: TaskStream) -> dict[str, Any]:
        """"selector": share of test images of learned tasks routed to their own task, and of images of datasets
        not learned yet sent to zero-shot, over every evaluation row after the first task."""
        out = self._routing_rates(self.routing.items())
        return {"selector": out} if out else {}

    def task_statistics(self, learned: int) -> dict[str, dict[str, Any]]:
        """Per block: samples each expert took during the task ("experts/<block>/usage", counted since the last
        activate-freeze), how many experts it used and how many are frozen now; the DDAS rates of the row."""
        scalars: dict[str, float] = {}
        counts: dict[str, list[int]] = {}
        for key, adapter in self.model.adapters.items():
            usage = self._task_usage.get(key, [])
            counts[f"experts/{key}/usage"] = usage
            scalars[f"experts/{key}/used"] = sum(1 for u in usage if u > 0)
            scalars[f"experts/{key}/frozen"] = int(adapter.pool.frozen.sum())
        rates = self._routing_rates([(learned, self.routing.get(learned, {}))])
        scalars.update({f"selector/{k}": v for k, v in rates.items()})
        return {"scalars": scalars, "counts": counts}

    @staticmethod
    def _routing_rates(rows) -> dict[str, float]:
        seen = seen_right = unseen = unseen_zero = 0
        for learned, datasets in rows:
            for dataset, counts in datasets.items():
                if learned == 0:
                    continue
                total = sum(counts.values())
                if dataset < learned:
                    seen, seen_right = seen + total, seen_right + counts.get(dataset, 0)
                else:
                    unseen, unseen_zero = unseen + total, unseen_zero + counts.get(ZERO_SHOT, 0)
        out = {}
        if seen:
            out["task_selection_accuracy"] = seen_right / seen
        if unseen:
            out["zero_shot_rate_unseen"] = unseen_zero / unseen
        return out

    def report_extra(self, stream: TaskStream) -> dict[str, Any]:
        """The final row's routing per dataset, and where images of datasets not learned yet went at each earlier
        checkpoint ({"<dataset>, after <task>": {branch: count}})."""
        if self.selector is None:
            return {}
        names = [t.name for t in stream.tasks]
        final = self.routing.get(len(names), {})
        confusion = {names[j]: self._named(final[j], names) for j in sorted(final)}
        unseen = {}
        for learned in sorted(k for k in self.routing if 0 < k < len(names)):
            for j in sorted(d for d in self.routing[learned] if d >= learned):
                unseen[f"{names[j]}, after {names[learned - 1]}"] = self._named(self.routing[learned][j], names)
        return {"selector_confusion": confusion, "selector_unseen_routing": unseen, "selector_cost": self.selector_cost()}

    def selector_cost(self) -> dict[str, Any]:
        """What the selector costs: its parameters, the bytes of its saved state (selector/'s tensors), fit seconds
        and selection microseconds per test image on this process (this machine's clock, not a benchmark)."""
        sel, t = self.selector, self.selector_time
        return {
            "selector": sel.NAME,
            "parameters": sum(p.numel() for p in sel.parameters()),
            "state_bytes": sum(v.numel() * v.element_size() for v in sel.state_dict().values()),
            "fit_s": round(t["fit_s"], 3),
            "selected_images": int(t["selected"]),
            "select_us_per_image": round(1e6 * t["select_s"] / t["selected"], 1) if t["selected"] else None,
        }

    @staticmethod
    def _named(counts: dict[int, int], names: list[str]) -> dict[str, int]:
        return {branch_name(b, names): counts[b] for b in sorted(counts, key=lambda b: (b == ZERO_SHOT, b))}

    # --- outputs and checkpoints -----------------------------------------------------------------------------
    def save_outputs(self, out: Path) -> None:
        self.model.save_adapters(out / ADAPTERS_DIR)
        if self.selector is not None:
            self.selector.save(out / SELECTOR_DIR)

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"adapters.{k}": v.detach().clone() for k, v in self.model.adapters.state_dict().items()}
        state: dict[str, Any] = {"num_tasks": self.model.num_tasks, "selector_tasks": 0}
        if self.selector is not None:
            tensors.update({f"selector.{k}": v.detach().clone() for k, v in self.selector.state_dict().items()})
            state["selector_tasks"] = self.selector.num_tasks
            state["selector_extra"] = self.selector.extra_state()
            state["selector_time"] = dict(self.selector_time)
            state["routing"] = {
                str(learned): {str(j): {str(b): n for b, n in c.items()} for j, c in row.items()}
                for learned, row in self.routing.items()
            }
        return tensors, state

    def restore_from_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        while self.model.num_tasks < state["num_tasks"]:
            self.model.add_task()
        self.model.adapters.load_state_dict(prefixed(tensors, "adapters."))
        if self.selector is not None:
            self.selector.load_state_dict(prefixed(tensors, "selector."))  # rebuilds the autoencoders where its buffers are (the placement)
        self.routing = {
            int(learned): {int(j): {int(b): int(n) for b, n in c.items()} for j, c in row.items()}
            for learned, row in state.get("routing", {}).items()
        }
        self.selector_time.update(state.get("selector_time", {}))  # (checkpoints written before it: from zero)
        self.invalidate_classifiers()
        self._zero_shot.clear()
        self._errors.clear()
        self._features_kept.clear()


def lr_epoch_rows(ds: ImageDataset) -> int | None:
    """The rows of a DDAS autoencoder's learning-rate epoch on `ds` when it is a sample (k-shot) of a larger split:
    that whole split, as the official code counts its full training loader (None: `ds` itself)."""
    return ds.drawn_from if ds.drawn_from > len(ds) else None


class DatasetFeatures:
    """DDAS features of a dataset's images, by row, through the engine's DataAccess (a selector FeatureSource):
    an autoencoder fit reads the rows its schedule names, in one pass or streamed, never the whole split at once."""

    def __init__(self, learner: MoEAdaptersLearner, data: DataAccess, ds: ImageDataset, name: str):
        self.learner, self.data, self.ds, self.name = learner, data, ds, name
        self.tag = zlib.crc32(name.encode())  # an int per dataset for augmentation seeds (str hashes vary by process)

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, groups, desc: str | None = None, augment: bool = False):
        groups = [g.tolist() for g in groups]
        # augmented: group k of this pass gets its own augmentation seed, as training step k of a task would
        seeds = [step_seed(self.learner.cfg.seed, self.tag, k) for k in range(len(groups))] if augment else None
        pixels = self.learner.eval_needs_pixels()
        batches = self.data.groups(self.ds, groups, pixels=pixels, desc=desc, augment_seeds=seeds)
        for group, batch in zip(groups, batches, strict=True):
            position = {self.ds.key(i): i for i in group}
            rows = torch.tensor([position[key] for key in batch.keys], dtype=torch.long)
            if len(batch):
                features = self.learner.selector_features(batch)
            else:  # every image of this share unreadable
                features = torch.zeros(0, self.learner.features.dim, device=self.learner.device)
            # multi-process: each process computed its share of the group; all get the whole group, in order
            yield self.data.gather_rows(rows), self.data.gather_rows(features)

    def read_augmented(self, groups):
        """`read` through the training transform, every group with an augmentation of its own (selector.train_augment:
        the official code's autoencoders read freshly augmented training batches)."""
        return self.read(groups, augment=True)

    def rows(self, rows: torch.Tensor):
        size = self.data.batch_size
        return self.read(list(rows.split(size)), desc=f"DDAS features {self.name}")
