"""Prototype selector (selector.kind "prototype"): the task of an image from the frozen backbone's own features.

DDAS trains an autoencoder per task on another network's features and routes by reconstruction error. This selector
keeps, per task, only the mean direction of each of its classes in the backbone's own (unsquashed) feature space,
and a threshold calibrated on that task's held-out images:

    x̂          = x / ||x||                                      (the backbone's selector features, L2-normalised)
    p_c        = mean of x̂ over the training images of class c, normalised        (a task: one per class)
    d_t(x)     = 1 - max_{c in task t} <x̂, p_c>                 (cosine distance to task t's nearest prototype)
    threshold_t = quantile_{cfg.prototype_quantile}( d_t over the task's held-out images )
    chosen     = argmin_t d_t(x), or ZERO_SHOT (-1) when d_t(x) > threshold_t for that winner

Held-out images: a seeded cfg.heldout_fraction of the task's training images, never part of its prototypes (a task
of one image calibrates on it). A finished task's prototypes and threshold never change; fitting reads each of the
task's images once, in the source's chunks (prototype sums, then the held-out distances), so host memory is bounded
by one chunk and the prototypes. Without labels a task gets one prototype, the mean of all its images.

Why the backbone's own features, unsquashed: DDAS squashes them into (0, 1) for its sigmoid autoencoders; cosine
geometry needs none of that. Why cosine prototypes and not a Gaussian per task: on the quickstart stream (measured
with scripts/measure_selectors.py) class-mean cosine distance separated the tasks at least as well as Mahalanobis
distances (shared or per-class covariance, relative to a reference Gaussian) and k-nearest-neighbour distances,
with none of their covariance estimates; centring or whitening on the reference images did not help either, so this
selector uses no reference images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moecl.branches import ZERO_SHOT
from moecl.config import SelectorConfig
from moecl.selector.base import CALIBRATION_FIELDS, TaskSelector, heldout_count
from moecl.selector.ddas import as_source


class PrototypeSelector(TaskSelector):
    """Per-task class prototypes of L2-normalised backbone features; see the module docstring."""

    KIND = "prototype"
    NAME = "prototype selector"
    TENSORS_FILE = "prototypes.safetensors"
    SQUASHED_FEATURES = False
    USES_REFERENCE = False
    LABEL = "prototype"
    CLASS_VECTORS = 1  # its prototypes (per-task threshold and calibration: 5 floats, not counted)

    def __init__(self, cfg: SelectorConfig, feature_dim: int, seed: int = 0, progress: bool = False):
        super().__init__(cfg, feature_dim, seed, progress)
        self.register_buffer("prototypes", torch.zeros(0, self.feature_dim))  # (P, F) unit rows, every task's
        self.register_buffer("owner", torch.zeros(0, dtype=torch.long))  # (P,) the task of each prototype

    @property
    def num_tasks(self) -> int:
        return len(self.thresholds)

    def allocate(self, num_tasks: int, reference: bool) -> PrototypeSelector:
        """Shapes of `num_tasks` fitted tasks (one prototype each: the class counts come with load_state_dict)."""
        self._resize(num_tasks, num_tasks)
        self.owner.copy_(torch.arange(num_tasks))
        return self

    def _resize(self, tasks: int, prototypes: int) -> None:
        self.prototypes = self.prototypes.new_zeros(prototypes, self.feature_dim)
        self.owner = self.owner.new_zeros(prototypes)
        self.thresholds = self.thresholds.new_zeros(tasks)
        self.calibration = self.calibration.new_zeros(tasks, len(CALIBRATION_FIELDS))
        self.task_count.fill_(tasks)

    # -- fitting ------------------------------------------------------------------------------------------------
    def fit_task(
        self,
        features: Any,
        heldout: Any = None,
        lr_epoch_rows: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> int:
        """Prototypes and threshold of the next task from `features` (its training images: a tensor or a
        FeatureSource) and their class `labels` (None: one prototype); returns the task index. `heldout`: the
        images to calibrate on instead of a held-out share of `features`. `lr_epoch_rows` is unused (no training)."""
        if isinstance(features, torch.Tensor) and features.ndim == 2:
            self._check(features, "features")  # the whole tensor's shape in the message, not the first chunk's
        source = as_source(features)
        n = len(source)
        if n == 0:
            raise ValueError(f"{self.NAME} task features: no feature vectors (empty dataset?)")
        task = self.num_tasks
        labels = torch.zeros(n, dtype=torch.long) if labels is None else torch.as_tensor(labels, dtype=torch.long).cpu()
        if labels.shape != (n,):
            raise ValueError(f"{self.NAME}: {len(labels)} labels for {n} feature vectors")
        classes, index = labels.unique(return_inverse=True)
        held = torch.zeros(n, dtype=torch.bool)
        if heldout is None and (n_held := heldout_count(n, self.cfg)):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self._seed(task)))
            held[order[:n_held]] = True
        sums = torch.zeros(len(classes), self.feature_dim, dtype=torch.float64, device=self.thresholds.device)
        counts = torch.zeros(len(classes), dtype=torch.long)
        for rows, f in source.rows((~held).nonzero().flatten()):  # the held-out rows are read once, below
            rows = rows.cpu()
            sums.index_add_(0, index[rows].to(sums.device), self.prepared(f).double())
            counts.index_add_(0, index[rows], torch.ones(len(rows), dtype=torch.long))
        present = counts > 0
        if not bool(present.any()):
            raise ValueError(f"{self.NAME}: no readable training images for task {task}")
        protos = torch.nn.functional.normalize(sums[present.to(sums.device)], dim=1).to(self.prototypes.dtype)
        if heldout is not None:
            calibration = as_source(heldout)
            chunks = (self.prepared(f) for _, f in calibration.rows(torch.arange(len(calibration))))
        elif bool(held.any()):
            chunks = (self.prepared(f) for _, f in source.rows(held.nonzero().flatten()))
        else:  # a single image: calibrated on what it was fitted on
            chunks = (self.prepared(f) for _, f in source.rows(torch.arange(n)))
        distance = torch.cat([_distance(x, protos) for x in chunks]).double()
        if len(distance) == 0:
            raise ValueError(f"{self.NAME}: no readable images to calibrate task {task}'s threshold on")
        q = self._add_calibration(distance, self.cfg.prototype_quantile)
        self.prototypes = torch.cat([self.prototypes, protos])
        self.owner = torch.cat([self.owner, self.owner.new_full((len(protos),), task)])
        self.thresholds = torch.cat([self.thresholds, q.to(self.thresholds).reshape(1)])
        self.task_count.fill_(self.num_tasks)
        return task

    @classmethod
    def task_reads(cls, cfg: SelectorConfig, images: int) -> int:
        """Every training image once: the kept ones for the prototype sums, the held-out ones for the threshold. A
        task with nothing held out (a single image) calibrates on what it was fitted on, reading it twice."""
        return images if heldout_count(images, cfg) else 2 * images

    def _seed(self, task: int) -> int:
        return (self.seed * 1_000_003 + task + 1) % (2**63)

    # -- selection ----------------------------------------------------------------------------------------------
    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(features, dim=1)

    @torch.no_grad()
    def task_errors(self, prepared: torch.Tensor, first: int = 0) -> torch.Tensor:
        """(B, T - first) cosine distances of `prepare`d features to the nearest prototype of tasks first..T-1."""
        cols = [_distance(prepared, self.prototypes[self.owner == t]) for t in range(first, self.num_tasks)]
        return torch.stack(cols, dim=1) if cols else prepared.new_zeros(len(prepared), 0)

    def _decide_rows(self, errors: torch.Tensor) -> torch.Tensor:
        best, task = errors[:, : self.num_tasks].min(dim=1)
        zero = best > self.thresholds.to(errors.device)[task]
        return torch.where(zero, torch.full_like(task, ZERO_SHOT), task)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Restores the shapes (tasks, prototypes) from the state first, then the values."""
        tasks = len(state_dict["thresholds"]) if "thresholds" in state_dict else 0
        prototypes = len(state_dict["prototypes"]) if "prototypes" in state_dict else 0
        self._resize(tasks, prototypes)
        return self._load_checked(state_dict, strict, assign)

    def extra_state(self) -> dict[str, Any]:
        prototypes = [int((self.owner == t).sum()) for t in range(self.num_tasks)]
        return {**super().extra_state(), "prototypes_per_task": prototypes}


def _distance(prepared: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B,) cosine distance of unit rows to the nearest of `prototypes` (unit rows)."""
    return 1 - (prepared @ prototypes.t()).max(dim=1).values

