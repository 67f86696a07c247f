"""Parameter counts of a run configuration (`moecl params`), built without downloading or allocating weights."""

from __future__ import annotations

from typing import Any

import torch

from moecl.config import RunConfig
from moecl.selector.features import feature_dim


def autoencoder_parameters(features: int, hidden: int) -> int:
    """Linear(F→hidden) + Linear(hidden→F), with biases (8,696,164 for the paper's 43,264→100)."""
    return features * hidden + hidden + hidden * features + features


def meta_model(cfg: RunConfig, num_tasks: int) -> Any:
    """The run's MoEAdapterModel on the meta device (shapes only, no weights), with the routers of `num_tasks`
    tasks (one with moe.single_router)."""
    from moecl.backbone import build_backbone
    from moecl.moe.model import MoEAdapterModel

    if num_tasks < 0:
        raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
    with torch.device("meta"):
        model = MoEAdapterModel(build_backbone(cfg.backbone, pretrained=False), cfg.moe)
        for _ in range(num_tasks):
            model.add_task()
    return model


def count_parameters(
    cfg: RunConfig, num_tasks: int, selector_feature_dim: int | None = None, model: Any = None
) -> dict[str, Any]:
    """{"moe", "selector", "trainable", "total", "per_tower": {"image", "text"}} as `moecl params --json` prints.

    The model is built on the meta device (`meta_model`, or the `model` given: one built by it for the same
    config and task count). The selector has one autoencoder per task plus the reference one (when configured) over
    the DDAS feature width (selector.features on this backbone, unless `selector_feature_dim` is given); it is left
    out for single-router (CIL) runs, which never route by DDAS. "trainable" = moe + selector (everything the run
    trains over its tasks); "total" adds the frozen backbone; "per_tower" = MoE parameters per tower.
    """
    model = model if model is not None else meta_model(cfg, num_tasks)
    counts = model.parameter_counts()
    selector = 0
    if cfg.selector.enabled and not cfg.moe.single_router:
        if selector_feature_dim is None:
            selector_feature_dim = feature_dim(cfg.selector.features, model.backbone)
        n_autoencoders = num_tasks + (1 if cfg.selector.reference else 0)
        selector = n_autoencoders * autoencoder_parameters(selector_feature_dim, cfg.selector.hidden)
    return {
        "moe": counts["moe"],
        "selector": selector,
        "trainable": counts["moe"] + selector,
        "total": counts["total"] + selector,
        "per_tower": counts["per_tower"],
    }
