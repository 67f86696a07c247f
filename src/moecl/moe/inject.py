"""Install one MoEAdapter at every MoE site the config asks for (peft-style `inject_*`)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from moecl.backbone.base import Backbone
from moecl.config import MoEConfig
from moecl.moe.layer import MoEAdapter


def inject_moe_adapters(backbone: Backbone, cfg: MoEConfig) -> nn.ModuleDict:
    """Creates and installs the adapters; returns them keyed "<tower>_<block>" (e.g. "image_3"; ModuleDict keys
    cannot contain "."), in site order.

    Adapters are created on the device of the backbone's parameters (meta included, for parameter counting).
    """
    device = next(iter(backbone.parameters())).device
    adapters = nn.ModuleDict()
    for site in backbone.moe_sites(cfg.towers, cfg.layers):
        key = site_key(site.tower, site.index)
        if key in adapters:
            raise ValueError(f"moe.layers: block {site.index} of the {site.tower} tower is listed twice")
        adapter = MoEAdapter(
            site.dim, cfg.num_experts, cfg.top_k, cfg.bottleneck, cfg.dropout, cfg.scale, cfg.noisy_gating,
            cfg.eval_noise,
        ).to(device)
        adapter.track_aux = cfg.load_balance_weight > 0
        site.install(adapter)
        adapters[key] = adapter
    return adapters


def site_key(tower: str, index: int) -> str:
    return f"{tower}_{index}"


def iter_moe_adapters(module: nn.Module) -> Iterator[tuple[str, MoEAdapter]]:
    """(qualified name, adapter) for every MoEAdapter inside `module`."""
    for name, child in module.named_modules():
        if isinstance(child, MoEAdapter):
            yield name, child
