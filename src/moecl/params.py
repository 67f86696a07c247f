"""Parameter counts of a run configuration (`moecl params`), built without downloading or allocating weights."""

from __future__ import annotations

from typing import Any

import torch

from moecl.config import RunConfig

ALEXNET_CONV5_FEATURES = 256 * 13 * 13  # 43,264: the paper's DDAS features


def autoencoder_parameters(features: int, hidden: int) -> int:
    """Linear(F→hidden) + Linear(hidden→F), with biases (8,696,164 for the paper's 43,264→100)."""
    return features * hidden + hidden + hidden * features + features


def count_parameters(cfg: RunConfig, num_tasks: int, selector_feature_dim: int | None = None) -> dict[str, Any]:
    """{"moe", "selector", "trainable", "total", "per_tower": {"image", "text"}} as `moecl params --json` prints.

    The model is built on the meta device (shapes only), with the routers of all `num_tasks` tasks (one with
    moe.single_router). The selector has one autoencoder per task plus the reference one (when configured); it is
    left out for single-router (CIL) runs, which never route by DDAS. "trainable" = moe + selector (everything the
    run trains over its tasks); "total" adds the frozen backbone; "per_tower" = MoE parameters per tower.
    """
    from moecl.backbone import build_backbone
    from moecl.moe.model import MoEAdapterModel

    if num_tasks < 0:
        raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
    with torch.device("meta"):
        backbone = build_backbone(cfg.backbone, pretrained=False)
        model = MoEAdapterModel(backbone, cfg.moe)
        for _ in range(num_tasks):
            model.add_task()
    counts = model.parameter_counts()
    selector = 0
    if cfg.selector.enabled and not cfg.moe.single_router:
        if selector_feature_dim is None:
            selector_feature_dim = ALEXNET_CONV5_FEATURES if cfg.selector.features == "alexnet" else backbone.embed_dim
        n_autoencoders = num_tasks + (1 if cfg.selector.reference else 0)
        selector = n_autoencoders * autoencoder_parameters(selector_feature_dim, cfg.selector.hidden)
    return {
        "moe": counts["moe"],
        "selector": selector,
        "trainable": counts["moe"] + selector,
        "total": counts["total"] + selector,
        "per_tower": counts["per_tower"],
    }
