"""What every task selector is (selector.kind: "ddas", "prototype"): which task's router a test image goes to.

A selector sees one feature vector per image (selector/features.py) and keeps, per learned task, statistics that
never change once the task is fitted. Its scores are laid out as one (B, T+U+1) table, lower = better:

    columns 0..T-1    the T learned tasks                  (`task_errors`: a finished task's column never changes,
                                                            so the learner keeps them per image and adds new ones)
    columns T..T+U-1  untrained task slots (DDAS with selector.untrained_in_argmin only; U = 0 otherwise)
    the last column   the reference (DDAS's reference autoencoder; +inf when the selector has none)

and `decide` turns a table into one branch per image: a task index, or ZERO_SHOT (-1) for the untouched backbone.
selector.decision "batch" (the official code's) decides once per evaluation batch, on the mean of each column.

A saved selector is a folder: its tensors (`TENSORS_FILE`, safetensors) and selector.json (format, its config,
what the tensors hold); `load_selector` reads the kind from that config. `state_dict()` alone restores a selector.
"""

from __future__ import annotations

import abc
import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from moecl.branches import ZERO_SHOT
from moecl.checkpoint import atomic_write_json, load_tensors, save_tensors
from moecl.config import SelectorConfig, from_dict, to_dict
from moecl.device import full_precision

STATE_FILE = "selector.json"
FORMAT_VERSION = 1
# per task, statistics of the held-out scores its threshold was calibrated on (the `calibration` buffer's columns)
CALIBRATION_FIELDS = ("quantile", "mean", "std", "count")

# selector.kind -> "module:Class"; modules import lazily
SELECTORS: dict[str, str] = {
    "ddas": "moecl.selector.ddas:AutoSelector",
    "prototype": "moecl.selector.prototype:PrototypeSelector",
}


class TaskSelector(nn.Module, abc.ABC):
    """A selector over precomputed features (B, feature_dim); see the module docstring for the score layout."""

    KIND: ClassVar[str]
    NAME: ClassVar[str]  # in messages
    TENSORS_FILE: ClassVar[str]
    # the features it reads: squashed into (0, 1) (DDAS's autoencoders end in a sigmoid) or the backbone's own
    SQUASHED_FEATURES: ClassVar[bool] = True
    # whether it fits on the reference images (selector.reference) before the first task
    USES_REFERENCE: ClassVar[bool] = True
    # What a run of it costs, for `moecl plan` (counted from the config alone, see the cost methods below):
    LABEL: ClassVar[str]  # its short name in the plan's tables
    # whether a fit holds the features it reads (up to selector.memory_mb, else streamed) rather than one chunk
    HOLDS_FIT_FEATURES: ClassVar[bool] = False
    # feature-sized fp32 vectors it keeps per class of a fitted task outside its parameters (prototypes)
    CLASS_VECTORS: ClassVar[int] = 0

    def __init__(self, cfg: SelectorConfig, feature_dim: int, seed: int = 0, progress: bool = False):
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"{self.NAME} feature_dim must be positive, got {feature_dim}")
        self.cfg = cfg
        self.feature_dim = int(feature_dim)
        self.seed = int(seed)
        self.progress = progress  # progress bars (moecl.progress) while fitting
        self.register_buffer("task_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("thresholds", torch.zeros(0))  # one per learned task; also the selector's placement
        self.register_buffer("calibration", torch.zeros(0, len(CALIBRATION_FIELDS)))  # (T, CALIBRATION_FIELDS)

    # -- state --------------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def num_tasks(self) -> int: ...

    @property
    def has_reference(self) -> bool:
        return False

    @abc.abstractmethod
    def allocate(self, num_tasks: int, reference: bool) -> TaskSelector:
        """The shapes a selector has after that many fits (load_state_dict fills them in; parameter counts read
        them)."""

    def reserve_slots(self, tasks: int) -> None:
        """The number of tasks of the stream (only DDAS's untrained slots use it)."""

    @property
    def untrained_slots(self) -> int:
        return 0

    # -- fitting ------------------------------------------------------------------------------------------------
    def fit_reference(self, features: Any, lr_epoch_rows: int | None = None) -> Any:
        """Fit on the reference images' features (a tensor or a ddas.FeatureSource), when USES_REFERENCE."""
        raise TypeError(f"the {self.NAME} uses no reference images")

    @abc.abstractmethod
    def fit_task(
        self, features: Any, heldout: Any = None, lr_epoch_rows: int | None = None, labels: torch.Tensor | None = None
    ) -> int:
        """Fit the next task on its training images' features (`labels`: their classes, for selectors that use
        them); returns the task index."""

    def _add_calibration(self, scores: torch.Tensor, quantile: float) -> torch.Tensor:
        """Append the CALIBRATION_FIELDS of a task's held-out `scores` (1-D) to `calibration`; returns their
        `quantile`-quantile (float64, 0-d), from which the task's threshold is set."""
        q = torch.quantile(scores, quantile)
        spread = scores.std() if len(scores) > 1 else scores.new_zeros(())
        stats = torch.stack([q, scores.mean(), spread, scores.new_tensor(len(scores))])
        self.calibration = torch.cat([self.calibration, stats.to(self.calibration).unsqueeze(0)])
        return q

    # -- cost (moecl plan) --------------------------------------------------------------------------------------
    @classmethod
    def fits_reference(cls, cfg: SelectorConfig) -> bool:
        """Whether a run fits it on the reference images first (it uses them and selector.reference names some)."""
        return cls.USES_REFERENCE and cfg.reference is not None

    @classmethod
    def reference_reads(cls, cfg: SelectorConfig, images: int) -> int:
        """Images its reference fit reads out of `images` reference images (0: no reference fit)."""
        return 0

    @classmethod
    @abc.abstractmethod
    def task_reads(cls, cfg: SelectorConfig, images: int) -> int:
        """Images one task fit reads, through the engine's DataAccess, out of the task's `images` training images."""

    @classmethod
    def augmented_fits(cls, cfg: SelectorConfig) -> bool:
        """Whether its fits read images through the training transform, afresh each time (no cache serves them)."""
        return False

    # -- selection ----------------------------------------------------------------------------------------------
    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """What the per-task statistics see of checked features (identity unless a selector says otherwise)."""
        return features

    def prepared(self, features: torch.Tensor) -> torch.Tensor:
        """Checked and `prepare`d features, for task_errors / reference_errors."""
        return self.prepare(self._check(features, "features"))

    @abc.abstractmethod
    def task_errors(self, prepared: torch.Tensor, first: int = 0) -> torch.Tensor:
        """(B, T - first) scores of `prepare`d features for tasks first..T-1 (lower = better)."""

    def reference_errors(self, prepared: torch.Tensor) -> torch.Tensor:
        """(B,) the reference column (+inf: no reference, it never wins)."""
        return prepared.new_full((len(prepared),), float("inf"))

    def untrained_errors(self, prepared: torch.Tensor) -> torch.Tensor:
        """(B, U) the untrained slots' columns (none unless a selector has them)."""
        return prepared.new_zeros(len(prepared), 0)

    @torch.no_grad()
    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T+U+1): the tasks, the untrained slots, the reference last."""
        prepared = self.prepared(features)
        columns = [self.task_errors(prepared, 0), self.untrained_errors(prepared)]
        return torch.cat([*columns, self.reference_errors(prepared).unsqueeze(1)], dim=1)

    def decide(self, errors: torch.Tensor) -> torch.Tensor:
        """The branch per row of an `errors()` table (B,); cfg.decision "batch": one decision, on the mean
        scores of the B images, for all of them."""
        n = errors.shape[0]
        if self.num_tasks == 0:
            return torch.full((n,), ZERO_SHOT, dtype=torch.long, device=errors.device)
        if self.cfg.decision == "batch" and n:
            return self._decide_rows(errors.mean(dim=0, keepdim=True)).repeat(n)
        return self._decide_rows(errors)

    @abc.abstractmethod
    def _decide_rows(self, errors: torch.Tensor) -> torch.Tensor:
        """The decision of each row on its own."""

    @torch.no_grad()
    def select(self, features: torch.Tensor) -> torch.Tensor:
        """Per image: the chosen task index (0..T-1) or ZERO_SHOT (-1), as a LongTensor (B,)."""
        return self.decide(self.errors(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.select(features)

    def _check(self, features: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != self.feature_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{self.NAME} {what} must have shape (N, {self.feature_dim}), got {shape}")
        if what != "features" and len(features) == 0:
            raise ValueError(f"{self.NAME} {what}: no feature vectors (empty dataset?)")
        return full_precision(features.detach()).to(device=self.thresholds.device, dtype=self.thresholds.dtype)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """JSON summary of what the tensors hold (informational: state_dict() alone restores the selector); a
        selector adds its own fields."""
        return {
            "feature_dim": self.feature_dim,
            "seed": self.seed,
            "num_tasks": self.num_tasks,
            "thresholds": [float(t) for t in self.thresholds.tolist()],
            "calibration": [dict(zip(CALIBRATION_FIELDS, row, strict=True)) for row in self.calibration.tolist()],
        }

    def _load_checked(self, state_dict: Mapping[str, Any], strict: bool, assign: bool):
        try:
            result = nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)
        except RuntimeError as exc:
            raise ValueError(f"{self.NAME} selector state does not fit this selector: {exc}") from exc
        self.eval()
        return result

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tensors and selector.json (each atomically) into `directory`."""
        directory = Path(directory)
        save_tensors(directory / self.TENSORS_FILE, self.state_dict())
        state = {"format": FORMAT_VERSION, "kind": self.KIND, "config": to_dict(self.cfg), **self.extra_state()}
        atomic_write_json(directory / STATE_FILE, state)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TaskSelector:
        """The selector `save(directory)` wrote, in eval mode (its kind from selector.json; `cls` must match)."""
        selector = load_selector(directory)
        if not isinstance(selector, cls):
            raise ValueError(f"{directory}: a {selector.KIND!r} selector, not {cls.KIND!r}")
        return selector


def selector_class(kind: str) -> type[TaskSelector]:
    if kind not in SELECTORS:
        raise ValueError(f"selector.kind must be one of {', '.join(SELECTORS)}, got {kind!r}")
    module, name = SELECTORS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build_selector(cfg: SelectorConfig, feature_dim: int, seed: int = 0, progress: bool = False) -> TaskSelector:
    """The empty selector cfg.kind names."""
    return selector_class(cfg.kind)(cfg, feature_dim, seed=seed, progress=progress)


def load_selector(directory: str | os.PathLike) -> TaskSelector:
    """The selector saved in `directory` (any kind), in eval mode."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"selector: {state_path} is missing (not a saved selector directory?)")
    try:
        meta = json.loads(state_path.read_text())
        cfg = from_dict(SelectorConfig, meta["config"], "selector")  # saved before kinds existed: "ddas"
        cls = selector_class(meta.get("kind", cfg.kind))
        selector = cls(cfg, int(meta["feature_dim"]), seed=int(meta.get("seed", 0)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{state_path}: not a valid selector state ({exc})") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{state_path}: unsupported selector format {meta.get('format')!r}")
    tensors_path = directory / cls.TENSORS_FILE
    if not tensors_path.is_file():
        raise FileNotFoundError(f"{cls.NAME} selector: {tensors_path} is missing (not a saved selector directory?)")
    selector.load_state_dict(load_tensors(tensors_path))
    if selector.num_tasks != int(meta.get("num_tasks", selector.num_tasks)):
        raise ValueError(f"{directory}: {STATE_FILE} and {cls.TENSORS_FILE} disagree on the number of tasks")
    return selector.eval()


def heldout_count(n: int, cfg: SelectorConfig) -> int:
    """How many of a task's `n` feature vectors a selector's `fit_task` holds out of its fit to calibrate an "auto"
    threshold (0: none, with a numeric threshold or a single vector)."""
    if cfg.threshold != "auto" or n < 2:
        return 0
    return min(n - 1, max(1, round(cfg.heldout_fraction * n)))
