"""The one parameter counter: `moecl params` (a learner's parameters built on the meta device from the config) and
metrics.json (the learner a run trained) both count through `parameter_counts`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moecl.config import RunConfig


@dataclass(frozen=True)
class ParameterParts:
    """What a learner's parameters are made of (Learner.parameter_parts)."""

    model: nn.Module  # what predicts: an MoEAdapterModel or the bare backbone (adapters installed in it included)
    trained: tuple[nn.Parameter, ...]  # what the method trains over a whole run (every task's routers, the towers)
    selector: nn.Module | None = None  # DDAS autoencoders (reference and one per task), trained apart from the model


def parameter_counts(parts: ParameterParts) -> dict[str, Any]:
    """{"moe", "selector", "trainable", "total", "per_tower": {"image", "text"}}.

    moe: MoE adapter parameters (experts and every task's router); selector: the DDAS autoencoders; "trainable":
    what the run trains over all its tasks plus the selector; "total": the model (frozen backbone included) plus the
    selector; "per_tower": MoE parameters per tower (empty without adapters)."""
    from moecl.moe.model import MoEAdapterModel

    per_tower: dict[str, int] = {}
    if isinstance(parts.model, MoEAdapterModel):
        per_tower = {"image": 0, "text": 0}
        for key, adapter in parts.model.adapters.items():
            tower = key.rsplit("_", 1)[0]
            per_tower[tower] = per_tower.get(tower, 0) + _numel(adapter.parameters())
    selector = _numel(parts.selector.parameters()) if parts.selector is not None else 0
    return {
        "moe": sum(per_tower.values()),
        "selector": selector,
        "trainable": _numel(parts.trained) + selector,
        "total": _numel(parts.model.parameters()) + selector,
        "per_tower": per_tower,
    }


def _numel(params) -> int:
    unique = {id(p): p for p in params}  # shared tensors count once
    return int(sum(p.numel() for p in unique.values()))


def meta_parts(cfg: RunConfig, num_tasks: int) -> ParameterParts:
    """The parameters the learner of `cfg` holds after `num_tasks` tasks, built on the meta device (shapes only: no
    weights downloaded or allocated, no data read)."""
    from moecl.backbone import build_backbone
    from moecl.methods import learner_class

    if num_tasks < 0:
        raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
    with torch.device("meta"):
        backbone = build_backbone(cfg.backbone, pretrained=False)
        return learner_class(cfg.method).parts_after(backbone, cfg, num_tasks)


def count_parameters(cfg: RunConfig, num_tasks: int) -> dict[str, Any]:
    """`moecl params --json`: parameter_counts of `meta_parts`."""
    return parameter_counts(meta_parts(cfg, num_tasks))
