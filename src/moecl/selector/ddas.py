"""DDAS, the distribution-discriminative auto-selector (method.md §4): which task's router an image goes to.

One autoencoder (AE) per learned task plus an optional reference AE (trained first, on generic reference images).
For each image, independently of the rest of its batch:

    errors  = per-sample reconstruction MSE under every *trained* AE (untrained tasks never take part)
    winner  = argmin over the task AEs and the reference AE
    chosen  = ZERO_SHOT (-1) if the reference AE wins (ties go to the reference) or the winner's error is above its
              task's threshold; otherwise the winning task index.

The official code's rule instead (protocol "paper", docs/reproduce.md): cfg.decision "batch" takes the mean of
each column over the whole evaluation batch and decides once for all its images; cfg.untrained_in_argmin adds
the AEs of the stream's tasks not learned yet (`reserve_slots`), at their seeded initial weights, as further
columns after the trained ones (an image they win goes to that task's untrained router; their threshold is the
numeric cfg.threshold).

Input centring ("backbone" features only). The backbone features arrive as sigmoid(sqrt(F) * u) of a unit vector u
(features.squash). All natural-image embeddings share a large common component, so raw reconstruction errors mostly
measure how far an image is from that common direction. `fit_reference` therefore records the mean m of
logit(features) over the reference images, and every feature vector x the AEs see is re-squashed as
squash(logit(x) - m): the direction of the image's deviation from the generic reference image, at unit RMS. m comes
from the reference data alone, never from task data, so earlier tasks' AEs stay valid as tasks are added. The
paper's AlexNet features are used as they are.

`errors()` returns (B, T+U+1): column t = task t (t < T), then the U untrained slots (U = 0 unless
cfg.untrained_in_argmin), the LAST column = the reference AE (+inf when there is none, so it never wins).

Outlier exposure (cfg.negatives = "reference", off by default: the paper trains plain MSE AEs). `fit_reference`
keeps the prepared reference features and their reference-AE errors e_ref(r); every task AE then trains on

    MSE(task batch) + cfg.negative_weight * mean_r relu(1 - e_t(r) / e_ref(r))      (r: a batch of reference images)

so it is penalised only where it explains a generic reference image better than the reference AE does. Without it
a task AE is a generic image model too (e.g. caltech101's AE reconstructs digits better than the reference AE), and
images of unseen datasets win its argmin. Only the task's own data and the reference images are used, and earlier
tasks' AEs are untouched when tasks are added.

Thresholds. A number (cfg.threshold, the paper's 0.0655 full-shot / 0.06 few-shot) bounds the winner's raw error,
for every task, exactly as in the paper; it is only meaningful for the paper's AlexNet features. "auto" calibrates
one threshold per task from data the task's AE never trained on: `fit_task` holds out a seeded
cfg.heldout_fraction of the task's features (or uses the `heldout` features given), trains the AE on the rest, and
scores the held-out features by their *relative* error

    score_t(x) = e_t(x) / e_ref(x)        (e_t(x) alone when there is no reference AE)
    threshold_t = cfg.auto_margin * quantile_{cfg.auto_quantile}( score_t over the held-out features )

and at test time the winner t must also satisfy score_t(x) <= threshold_t. Dividing by the reference error makes
the test "how much better does task t's AE explain x than the generic reference AE", which removes what raw errors
mostly measure on backbone features: how easy an image is to reconstruct at all (sparse, simple images such as
digits get small errors under every AE and slipped under raw thresholds). The argmin is unchanged (e_ref is the same
for every task of a sample). Calibration statistics of the held-out scores (quantile, mean, std, count) and whether
each threshold is relative are stored in buffers, so `state_dict()` alone restores a selector.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from moecl.branches import ZERO_SHOT, ZERO_SHOT_NAME
from moecl.config import MIB, SelectorConfig
from moecl.selector.autoencoder import Autoencoder, FitSettings, Schedule, fit_autoencoder, schedule
from moecl.selector.base import CALIBRATION_FIELDS, TaskSelector, heldout_count
from moecl.selector.features import squash


class FeatureSource(Protocol):
    """The features of a dataset's images, by row, read in passes (an autoencoder fit never holds a whole split)."""

    def __len__(self) -> int: ...

    def read(self, groups: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass: for each group of rows, in order, (the rows that could be read, their features (n, F))."""
        ...

    def rows(self, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The features of sorted `rows`, in chunks of the source's choosing, as (rows read, features)."""
        ...


@runtime_checkable
class ImageSource(FeatureSource, Protocol):
    """A FeatureSource over images, which can also compute features of freshly augmented images
    (cfg.train_augment: every autoencoder step reads its batch through the training transform)."""

    def read_augmented(self, groups: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`read`, each group of rows through the training transform with an augmentation of its own."""
        ...


class TensorFeatures:
    """A FeatureSource over features already computed (N, F)."""

    def __init__(self, features: torch.Tensor):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def read(self, groups: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for group in groups:
            yield group, self.features[group.to(self.features.device)]

    def rows(self, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self.read([rows])


def as_source(features: torch.Tensor | FeatureSource) -> FeatureSource:
    if isinstance(features, torch.Tensor):
        if features.ndim != 2:
            raise ValueError(f"selector features must have shape (N, F), got {tuple(features.shape)}")
        return TensorFeatures(features)
    return features


class _Held:
    """The features of `rows` of a source, read in one pass and kept (a fit whose images fit in memory)."""

    def __init__(self, source: FeatureSource, rows: torch.Tensor, selector: AutoSelector, what: str):
        kept, feats = [], []
        for got, f in source.rows(rows):
            kept.append(got.cpu())
            feats.append(selector._check(f, what))
        if not feats or not sum(len(f) for f in feats):
            raise ValueError(f"DDAS {what}: no readable images")
        self.features = torch.cat(feats) if len(feats) > 1 else feats[0]
        self.lookup = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long)  # dataset row -> held row
        self.lookup[torch.cat(kept)] = torch.arange(len(self.features))

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        index = self.lookup[rows]
        return self.features[index[index >= 0].to(self.features.device)]

    def batches(self, groups: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        return (self.take(group) for group in groups)


class AutoSelector(TaskSelector):
    """DDAS over precomputed features (B, feature_dim) in (0, 1); see the module docstring for the decision rule."""

    KIND = "ddas"
    NAME = "DDAS"
    TENSORS_FILE = "autoencoders.safetensors"
    LABEL = "DDAS"
    HOLDS_FIT_FEATURES = True

    def __init__(self, cfg: SelectorConfig, feature_dim: int, seed: int = 0, progress: bool = False):
        super().__init__(cfg, feature_dim, seed, progress)
        self.reference = nn.ModuleList()  # zero or one AE
        self.task_autoencoders = nn.ModuleList()
        self.register_buffer("relative", torch.zeros(0, dtype=torch.bool))  # threshold on e_t / e_ref (per task)
        self.register_buffer("input_center", torch.zeros(0))  # (F,) mean reference logit, or empty: no centring
        # cfg.negatives == "reference": the prepared reference features and their reference-AE errors, kept (and
        # saved) so task AEs fitted later, also after a resume, can use them as negatives; empty otherwise.
        self.register_buffer("negative_features", torch.zeros(0, self.feature_dim))
        self.register_buffer("negative_errors", torch.zeros(0))
        # cfg.untrained_in_argmin: the number of tasks of the stream (their AE slots), set by `reserve_slots`
        self.register_buffer("task_slots", torch.zeros((), dtype=torch.long))
        self._untrained: dict[tuple[int, str], Autoencoder] = {}  # (slot, device): initial weights, not state

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.task_autoencoders)

    @property
    def has_reference(self) -> bool:
        return len(self.reference) > 0

    def allocate(self, num_tasks: int, reference: bool) -> AutoSelector:
        """Untrained autoencoders for `num_tasks` tasks (and the reference one): the shapes a selector has after that
        many fits (load_state_dict fills them in; parameter counts read them)."""
        self.reference = nn.ModuleList([self._new_autoencoder(0)] if reference else [])
        self.task_autoencoders = nn.ModuleList(self._new_autoencoder(t + 1) for t in range(num_tasks))
        return self

    def reserve_slots(self, tasks: int) -> None:
        """The number of tasks the stream will have: with cfg.untrained_in_argmin, the AEs of those not learned
        yet take part in the argmin (the official code's list of 12 autoencoders)."""
        self.task_slots.fill_(int(tasks))

    @property
    def untrained_slots(self) -> int:
        """Columns of untrained task AEs in `errors()` (0 unless cfg.untrained_in_argmin)."""
        if not self.cfg.untrained_in_argmin:
            return 0
        return max(0, int(self.task_slots) - self.num_tasks)

    def _new_autoencoder(self, slot: int) -> Autoencoder:
        # Seeded init that leaves the global RNG untouched; slot 0 = reference, t + 1 = task t.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(slot))
            ae = Autoencoder(self.feature_dim, self.cfg.hidden)
        ref = self.thresholds  # the selector's placement: a learner moves it with its buffers
        return ae.to(device=ref.device, dtype=ref.dtype)

    def _seed(self, slot: int) -> int:
        return (self.seed * 1_000_003 + slot) % (2**63)

    # -- cost (moecl plan) --------------------------------------------------------------------------------------
    # A fit reads at most iterations x batch_size images (its autoencoder never sees more) plus, with an "auto"
    # threshold, the held-out calibration images; with cfg.train_augment every step reads its batch afresh: exactly
    # iterations x batch_size.
    @classmethod
    def reference_reads(cls, cfg: SelectorConfig, images: int) -> int:
        return _fit_reads(cfg, images, cfg.reference_iterations) if cls.fits_reference(cfg) else 0

    @classmethod
    def task_reads(cls, cfg: SelectorConfig, images: int) -> int:
        held = heldout_count(images, cfg)
        return _fit_reads(cfg, images - held, cfg.iterations) + held

    @classmethod
    def augmented_fits(cls, cfg: SelectorConfig) -> bool:
        return cfg.train_augment

    # -- fitting ------------------------------------------------------------------------------------------------
    # A fit reads features through a FeatureSource: a tensor (TensorFeatures) or a pass over a dataset (the
    # learner's). Its schedule is drawn first; the features of the images it reads are then held when they fit in
    # cfg.memory_mb (one pass), or streamed (computed again for every batch) when they do not, so host memory is
    # bounded by the configuration, not by the size of the dataset.
    def _held_rows(self) -> int:
        return int(self.cfg.memory_mb * MIB) // (4 * self.feature_dim)

    def _prepared(self, features: torch.Tensor, what: str) -> torch.Tensor:
        return self.prepare(self._check(features, "features"))  # a batch may be empty (unreadable images)

    def _fit(
        self, ae: Autoencoder, batches: Iterable[torch.Tensor], plan: Schedule, desc: str, negatives: bool
    ) -> list[float]:
        cfg = self.cfg
        settings = FitSettings(cfg.lr, cfg.weight_decay, cfg.lr_step_epochs, cfg.negative_weight if negatives else 0.0)
        neg, neg_errors = (self.negative_features, self.negative_errors) if negatives else (None, None)
        return fit_autoencoder(ae, batches, plan, settings, self.progress, desc, neg, neg_errors)

    def _training_reads(
        self, source: FeatureSource, groups: Sequence[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The features of an autoencoder's training batches: as they are, or (cfg.train_augment) freshly
        augmented for every step, which only a source of images can do (such a fit is always streamed)."""
        if not self.cfg.train_augment:
            return source.read(groups)
        if not isinstance(source, ImageSource):
            raise ValueError("selector.train_augment needs the images (a dataset), not precomputed features")
        return source.read_augmented(groups)

    def _uses_negatives(self) -> bool:
        return len(self.negative_errors) > 0 and self.cfg.negative_weight > 0

    def fit_reference(self, features: torch.Tensor | FeatureSource, lr_epoch_rows: int | None = None) -> list[float]:
        """Train the reference AE (cfg.reference_iterations) on generic reference features; returns its losses.
        `lr_epoch_rows`: the size of the split the features were drawn from (k-shot), see Schedule.lr_epoch."""
        source = as_source(features)
        if len(source) == 0:
            raise ValueError("DDAS reference features: no feature vectors (empty dataset?)")
        iterations, seed = self.cfg.reference_iterations, self._seed(0) + 1
        plan = schedule(len(source), iterations, self.cfg.batch_size, seed, lr_epoch_rows=lr_epoch_rows)
        rows = plan.distinct() if plan.batches else torch.arange(min(len(source), max(1, self._held_rows())))
        ae = self._new_autoencoder(0)
        if len(rows) <= self._held_rows() and not self.cfg.train_augment:
            held = _Held(source, rows, self, "reference features")
            if self.cfg.features == "backbone":
                self.input_center = _logit(held.features).mean(dim=0)
            held.features = self.prepare(held.features)
            losses = self._fit(ae, held.batches(plan.batches), plan, "DDAS reference AE", negatives=False)
            negative_rows = None
        else:
            if self.cfg.features == "backbone":
                self.input_center = self._streamed_center(source, rows)
            batches = (self._prepared(f, "reference features") for _, f in self._training_reads(source, plan.batches))
            losses = self._fit(ae, batches, plan, "DDAS reference AE", negatives=False)
            pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self._seed(0) + 3))
            negative_rows = rows[pick[: self._held_rows()]].sort().values
        self.reference = nn.ModuleList([ae.eval()])
        if self.cfg.negatives == "reference":
            # negatives: the prepared features of the images the reference AE trained on (a seeded sample of them
            # when they exceed cfg.memory_mb)
            if negative_rows is None:
                feats = held.features
            elif len(negative_rows):
                feats = self.prepare(_Held(source, negative_rows, self, "negatives").features)
            else:  # cfg.memory_mb holds not even one feature vector: no negatives
                feats = self.negative_features.new_zeros(0, self.feature_dim)
            self.negative_features = feats.detach().clone()
            self.negative_errors = ae.reconstruction_error(feats).detach()
        return losses

    def _streamed_center(self, source: FeatureSource, rows: torch.Tensor) -> torch.Tensor:
        total, count = None, 0
        for _, f in source.rows(rows):
            part = _logit(self._check(f, "features")).double().sum(dim=0)
            total, count = (part if total is None else total + part), count + len(f)
        return (total / count).to(self.thresholds.dtype)

    def fit_task(
        self,
        features: torch.Tensor | FeatureSource,
        heldout: torch.Tensor | FeatureSource | None = None,
        lr_epoch_rows: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> int:
        """Train the next task's AE on `features` (its train split) and set its threshold; returns the task index
        (`labels` are not used: an autoencoder models the task's images whatever their class).

        With threshold "auto" and no `heldout`, a seeded cfg.heldout_fraction of `features` is held out of training
        and used for calibration (a task with a single feature vector calibrates on it). Without held-out images
        the calibration statistics are those of the images the AE trained on. `lr_epoch_rows`: the size of the
        split the features were drawn from (k-shot), see Schedule.lr_epoch.
        """
        source = as_source(features)
        n = len(source)
        if n == 0:
            raise ValueError("DDAS task features: no feature vectors (empty dataset?)")
        task = self.num_tasks
        slot = task + 1
        held_rows = None
        train_rows = torch.arange(n)
        if heldout is None and (n_held := heldout_count(n, self.cfg)):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self._seed(slot) + 2))
            held_rows, train_rows = order[:n_held], order[n_held:]
        negatives = self._uses_negatives()
        n_neg = len(self.negative_errors) if negatives else 0
        plan = schedule(
            len(train_rows), self.cfg.iterations, self.cfg.batch_size, self._seed(slot) + 1, n_neg,
            lr_epoch_rows=lr_epoch_rows,
        )
        seen = train_rows[plan.distinct()]
        calib_rows = held_rows if held_rows is not None else seen
        needed = torch.cat([seen, held_rows]).unique() if held_rows is not None else seen.sort().values
        ae = self._new_autoencoder(slot)
        desc = f"DDAS task {task} AE"
        if len(needed) <= self._held_rows() and not self.cfg.train_augment:
            held = _Held(source, needed, self, "task features")
            held.features = self.prepare(held.features)
            self._fit(ae, held.batches([train_rows[b] for b in plan.batches]), plan, desc, negatives)
            calibration = [held.take(calib_rows)] if heldout is None else None
        else:
            reads = self._training_reads(source, [train_rows[b] for b in plan.batches])
            batches = (self._prepared(f, "task features") for _, f in reads)
            self._fit(ae, batches, plan, desc, negatives)
            calibration = None if heldout is not None else (
                self._prepared(f, "task features") for _, f in source.rows(calib_rows.sort().values)
            )
        if heldout is not None:
            held_source = as_source(heldout)
            calibration = (self._prepared(f, "held-out features") for _, f in held_source.rows(torch.arange(len(held_source))))
        ae.eval()
        relative = self.cfg.threshold == "auto" and self.has_reference
        scores = []
        for chunk in calibration:
            score = ae.reconstruction_error(chunk).double()
            if relative:
                score = score / self.reference[0].reconstruction_error(chunk).double().clamp_min(1e-12)
            scores.append(score)
        score = torch.cat(scores)
        if len(score) == 0:
            raise ValueError("DDAS: no readable images to calibrate the task's threshold on")
        q = self._add_calibration(score, self.cfg.auto_quantile)
        threshold = self.cfg.auto_margin * q if self.cfg.threshold == "auto" else float(self.cfg.threshold)
        self.task_autoencoders.append(ae)
        self.thresholds = torch.cat([self.thresholds, self.thresholds.new_tensor([float(threshold)])])
        self.relative = torch.cat([self.relative, self.relative.new_tensor([relative])])
        self.task_count.fill_(self.num_tasks)
        return task

    # -- selection ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def untrained_errors(self, prepared: torch.Tensor) -> torch.Tensor:
        """(B, U) errors of `prepare`d features under the initial weights of the untrained task slots (U = 0 unless
        cfg.untrained_in_argmin): the weights task t's AE starts from, as the official code keeps them until
        that task is trained."""
        cols = []
        for slot in range(self.num_tasks + 1, self.num_tasks + 1 + self.untrained_slots):
            key = (slot, str(self.thresholds.device))
            if key not in self._untrained:
                self._untrained[key] = self._new_autoencoder(slot).eval()
            cols.append(self._untrained[key].reconstruction_error(prepared))
        return torch.stack(cols, dim=1) if cols else prepared.new_zeros(len(prepared), 0)

    @torch.no_grad()
    def task_errors(self, prepared: torch.Tensor, first: int = 0) -> torch.Tensor:
        """(B, T - first) errors of `prepare`d features under task AEs first..T-1: a finished task's AE never
        changes, so callers may keep earlier columns and compute only the new ones."""
        cols = [ae.reconstruction_error(prepared) for ae in self.task_autoencoders[first:]]
        return torch.stack(cols, dim=1) if cols else prepared.new_zeros(len(prepared), 0)

    @torch.no_grad()
    def reference_errors(self, prepared: torch.Tensor) -> torch.Tensor:
        """(B,) errors of `prepare`d features under the reference AE (+inf when there is none: it never wins)."""
        if self.has_reference:
            return self.reference[0].reconstruction_error(prepared)
        return prepared.new_full((len(prepared),), float("inf"))

    def _decide_rows(self, errors: torch.Tensor) -> torch.Tensor:
        untrained = errors.shape[1] - 1 - self.num_tasks
        thresholds, relative = self.thresholds.to(errors.device), self.relative.to(errors.device)
        if untrained:  # only with a numeric threshold (checked): it bounds an untrained winner's raw error
            thresholds = torch.cat([thresholds, thresholds.new_full((untrained,), float(self.cfg.threshold))])
            relative = torch.cat([relative, relative.new_zeros(untrained)])
        best, task = errors[:, :-1].min(dim=1)
        ref = errors[:, -1]
        score = torch.where(relative[task], best / ref.clamp_min(1e-12), best)
        zero = (ref <= best) | (score > thresholds[task])
        return torch.where(zero, torch.full_like(task, ZERO_SHOT), task)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """What the AEs see: the features, centred on the reference (see the module docstring) once it is fitted."""
        if self.input_center.numel() == 0:
            return features
        return squash(_logit(features) - self.input_center)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Restores the number of task AEs and the reference from the state first, then the values."""
        n = int(state_dict["task_count"]) if "task_count" in state_dict else _count_tasks(state_dict)
        self.allocate(n, reference=any(k.startswith("reference.") for k in state_dict))
        self.thresholds = self.thresholds.new_zeros(n)
        self.calibration = self.calibration.new_zeros(n, len(CALIBRATION_FIELDS))
        self.relative = self.relative.new_zeros(n)
        center = state_dict.get("input_center")
        self.input_center = self.input_center.new_zeros(center.shape if center is not None else (0,))
        empty = {
            "negative_features": torch.zeros(0, self.feature_dim),
            "negative_errors": torch.zeros(0),
            "task_slots": torch.zeros((), dtype=torch.long),
        }
        state_dict = {**empty, **state_dict}  # states saved before reference negatives existed have none
        self.negative_features = self.negative_features.new_zeros(state_dict["negative_features"].shape)
        self.negative_errors = self.negative_errors.new_zeros(len(self.negative_features))
        return self._load_checked(state_dict, strict, assign)

    def extra_state(self) -> dict[str, Any]:
        return {
            **super().extra_state(),
            "has_reference": self.has_reference,
            "reference_column": "last",
            "input_centered": self.input_center.numel() > 0,
            "task_slots": int(self.task_slots),
            "relative_thresholds": [bool(r) for r in self.relative.tolist()],
        }


def _fit_reads(cfg: SelectorConfig, images: int, iterations: int) -> int:
    """Images an autoencoder fit of `iterations` steps reads out of `images` (see AutoSelector.task_reads)."""
    steps = iterations * cfg.batch_size
    return steps if cfg.train_augment else min(images, steps)


def _logit(x: torch.Tensor) -> torch.Tensor:
    return torch.logit(x, eps=1e-6)


def _count_tasks(state_dict: Mapping[str, Any]) -> int:
    idx = {int(k.split(".")[1]) for k in state_dict if k.startswith("task_autoencoders.")}
    return max(idx) + 1 if idx else 0


# ----------------------------------------------------------------------------------------------------------------
# Statistics for the engine and the report
# ----------------------------------------------------------------------------------------------------------------
def branch_name(choice: int, task_names: Sequence[str] | None = None) -> str:
    """Column label of a selection: the task name (or index) or "zero-shot"."""
    if choice == ZERO_SHOT:
        return ZERO_SHOT_NAME
    return task_names[choice] if task_names is not None else str(choice)


def selection_report(
    selected: torch.Tensor, true_task: torch.Tensor | None = None, task_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Counts of chosen branches; with `true_task` (task index per sample, ZERO_SHOT for images of datasets not
    learned yet) also task_selection_accuracy (learned-task images routed to their task) and zero_shot_rate_unseen
    (unseen-dataset images sent to zero-shot), with the totals they are computed from."""
    selected = selected.detach().long().cpu()
    counts: dict[str, int] = {}
    for choice, n in zip(*torch.unique(selected, return_counts=True), strict=True):
        counts[branch_name(int(choice), task_names)] = int(n)
    out: dict[str, Any] = {"total": int(selected.numel()), "counts": counts}
    if true_task is not None:
        true_task = true_task.detach().long().cpu().expand_as(selected)
        seen = true_task != ZERO_SHOT
        out["seen_total"] = int(seen.sum())
        out["seen_correct"] = int((selected[seen] == true_task[seen]).sum())
        out["unseen_total"] = int((~seen).sum())
        out["unseen_zero_shot"] = int((selected[~seen] == ZERO_SHOT).sum())
        out["task_selection_accuracy"] = out["seen_correct"] / out["seen_total"] if out["seen_total"] else None
        out["zero_shot_rate_unseen"] = out["unseen_zero_shot"] / out["unseen_total"] if out["unseen_total"] else None
    return out


def confusion_counts(
    selected: torch.Tensor,
    dataset: str,
    task_names: Sequence[str] | None = None,
    into: dict[str, dict[str, int]] | None = None,
) -> dict[str, dict[str, int]]:
    """Add the selections of images of `dataset` as one row of a confusion table {dataset: {branch: count}}
    (branches: task names and "zero-shot"), the structure report.md prints; returns the (updated) table."""
    table = into if into is not None else {}
    row = table.setdefault(dataset, {})
    for choice in selected.detach().long().cpu().tolist():
        col = branch_name(choice, task_names)
        row[col] = row.get(col, 0) + 1
    return table
