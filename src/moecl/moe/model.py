"""MoEAdapterModel: a frozen backbone with MoE adapters, per-task routers, activate-freeze and adapter I/O."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecl.backbone.base import Backbone
from moecl.branches import ZERO_SHOT
from moecl.config import MoEConfig, to_dict
from moecl.moe.inject import inject_moe_adapters
from moecl.moe.layer import MoEAdapter, Selection

ADAPTER_WEIGHTS = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1

# A task argument: None (zero-shot: the untouched backbone), an int task, or per-sample task ids (B,) with
# ZERO_SHOT (-1) = no adapter for that sample.
TaskArg = int | torch.Tensor | Sequence[int] | None


class MoEAdapterModel(nn.Module):
    """`task=None` everywhere means the zero-shot branch (every block exactly the original one)."""

    def __init__(self, backbone: Backbone, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone.freeze()
        self.adapters: nn.ModuleDict = inject_moe_adapters(self.backbone, cfg)
        self.num_tasks = 0
        self.eval()  # like the frozen backbone, a fresh model starts in eval mode (no routing noise, no dropout)

    # tasks and routing -------------------------------------------------------------------------------------------
    def add_task(self) -> int:
        """Adds a router to every adapter; returns the new task's router index. With moe.single_router only the
        first call adds one and every call returns 0."""
        if self.cfg.single_router and self.num_tasks == 1:
            return 0
        for adapter in self._adapters():
            adapter.add_router()
        self.num_tasks += 1
        return self.num_tasks - 1

    def seed_eval_noise(self, seed: int) -> None:
        """With moe.eval_noise: the routers' evaluation noise comes from one generator seeded with `seed` (so an
        evaluation row is a function of the seed and its batches, also after a resume)."""
        gen = torch.Generator(device=self._device()).manual_seed(seed)
        for adapter in self._adapters():
            for router in adapter.routers:
                router.eval_generator = gen

    def _selection(self, task: TaskArg) -> Selection:
        if task is None:
            return None
        if isinstance(task, torch.Tensor) and task.dim() == 0:
            task = int(task)
        if isinstance(task, (int,)) and not isinstance(task, bool):
            if not 0 <= task < self.num_tasks:
                raise ValueError(f"task {task} out of range: the model has {self.num_tasks} task(s)")
            return task
        ids = torch.as_tensor(task, dtype=torch.long)
        if ids.dim() != 1:
            raise ValueError(f"per-sample task ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < ZERO_SHOT or ids.max() >= self.num_tasks):
            raise ValueError(f"task ids must be in [{ZERO_SHOT}, {self.num_tasks - 1}], got {ids.unique().tolist()}")
        return ids

    @contextlib.contextmanager
    def task(self, task: TaskArg) -> Iterator[None]:
        """Select the routing for every adapter inside the block; the previous selection is restored on exit."""
        selection = self._selection(task)
        adapters = self._adapters()
        previous = [a.selection for a in adapters]
        for a in adapters:
            a.selection = selection
        try:
            yield
        finally:
            for a, p in zip(adapters, previous, strict=True):
                a.selection = p

    # encoding -----------------------------------------------------------------------------------------------------
    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.image_prefix(pixels)

    def prefix_blocks(self) -> int:
        return self.backbone.prefix_blocks()

    def image_suffix(self, prefix: torch.Tensor, task: TaskArg = None) -> torch.Tensor:
        with self.task(task):
            return self.backbone.image_suffix(prefix)

    def encode_image(self, pixels: torch.Tensor, task: TaskArg = None) -> torch.Tensor:
        return self.image_suffix(self.image_prefix(pixels), task)

    def encode_text(self, tokens: dict[str, torch.Tensor], task: TaskArg = None) -> torch.Tensor:
        with self.task(task):
            return self.backbone.encode_text(tokens)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.backbone.tokenize(texts)

    @property
    def logit_scale(self) -> float:
        return self.backbone.logit_scale

    def image_transform(self, train: bool):
        return self.backbone.image_transform(train)

    # training -----------------------------------------------------------------------------------------------------
    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        """The non-frozen experts of every block plus task `task`'s routers: exactly what the optimizer gets."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} out of range: the model has {self.num_tasks} task(s)")
        params: list[nn.Parameter] = []
        for adapter in self._adapters():
            adapter.pool._apply_frozen()  # a later backbone.freeze() must not silently stop training
            params += adapter.pool.trainable_parameters()
            for p in adapter.routers[task].parameters():
                p.requires_grad_(True)
                params.append(p)
        return params

    def end_task(self) -> dict[str, Any]:
        """Activate-freeze in every block (moe.freeze_per_task most-used experts of the task just trained) and reset
        the usage counts. Returns {"frozen": {site: newly frozen indices}, "frozen_total": {site: count}}."""
        newly, total = {}, {}
        for key, adapter in self.adapters.items():
            newly[key] = adapter.pool.freeze_most_used(self.cfg.freeze_per_task)
            total[key] = int(adapter.pool.frozen.sum())
        return {"frozen": newly, "frozen_total": total}

    def aux_loss(self) -> torch.Tensor:
        """Sum of the adapters' load-balancing losses from the last training forward (unweighted; multiply by
        moe.load_balance_weight). Consumed: a second call without a new forward returns 0."""
        losses = []
        for adapter in self._adapters():
            if adapter.last_aux is not None:
                losses.append(adapter.last_aux)
                adapter.last_aux = None
        if not losses:
            return torch.zeros((), device=self._device())
        return torch.stack(losses).sum()

    # bookkeeping --------------------------------------------------------------------------------------------------
    def adapter_config(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "moe": to_dict(self.cfg),
            "num_tasks": self.num_tasks,
            "architecture": self.backbone.architecture(),
        }

    def save_adapters(self, directory: str | os.PathLike) -> Path:
        """peft-style: only the adapters (experts, routers, frozen mask, usage) + adapter_config.json, atomically."""
        from moecl.checkpoint import atomic_write_text, save_tensors

        out = Path(directory)
        save_tensors(out / ADAPTER_WEIGHTS, self.adapters.state_dict())
        atomic_write_text(out / ADAPTER_CONFIG, json.dumps(self.adapter_config(), indent=2, sort_keys=True))
        return out

    def load_adapters(self, directory: str | os.PathLike) -> None:
        """Loads adapters saved by save_adapters; adds routers as needed. Raises ValueError naming the field that
        differs when they were saved for another backbone architecture or MoE config."""
        from safetensors.torch import load_file

        src = Path(directory)
        config_path, weights_path = src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ValueError(f"{path}: missing; expected a directory written by save_adapters")
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
        _check_equal(config_path, "architecture", saved.get("architecture", {}), self.backbone.architecture())
        _check_equal(config_path, "moe", _structural(saved.get("moe", {})), _structural(to_dict(self.cfg)))
        num_tasks = int(saved.get("num_tasks", 0))
        if num_tasks < self.num_tasks:
            raise ValueError(
                f"{config_path}: saved adapters have {num_tasks} task(s) but this model already has {self.num_tasks}"
            )
        while self.num_tasks < num_tasks:
            self.add_task()
        tensors = load_file(str(weights_path), device=str(self._device()))
        missing, unexpected = self.adapters.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights_path}: tensors do not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    # helpers ------------------------------------------------------------------------------------------------------
    def _adapters(self) -> list[MoEAdapter]:
        return list(self.adapters.values())

    def _device(self) -> torch.device:
        return next(iter(self.adapters.parameters())).device


# MoE fields that change the adapters' tensors or their function; training-only knobs (dropout, noise, freezing,
# load balancing) may differ between the run that saved and the one that loads.
STRUCTURAL_MOE_FIELDS = ("num_experts", "top_k", "bottleneck", "scale", "towers", "layers", "single_router")


def _structural(moe: dict[str, Any]) -> dict[str, Any]:
    return {k: moe.get(k) for k in STRUCTURAL_MOE_FIELDS}


def _check_equal(path: Path, section: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"{path}: {section}.{key} differs: saved {saved.get(key)!r}, this model {current.get(key)!r}; "
                "adapters only load onto the backbone and MoE config they were trained with"
            )
