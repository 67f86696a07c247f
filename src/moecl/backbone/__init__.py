"""Frozen dual-encoder backbones behind one interface (`Backbone`) and a factory from `BackboneConfig`."""

from __future__ import annotations

import typing

from moecl.backbone.base import Backbone, MoESite
from moecl.config import BackboneConfig, BackboneName

BACKBONES: tuple[str, ...] = typing.get_args(BackboneName)

__all__ = ["BACKBONES", "Backbone", "MoESite", "build_backbone"]


def build_backbone(cfg: BackboneConfig, pretrained: bool = True) -> Backbone:
    """`pretrained=False` builds random weights from the architecture alone (no download; meta-device friendly)."""
    # Imported lazily: each backbone pulls in its own heavy dependencies.
    if cfg.name == "clip":
        from moecl.backbone.clip import CLIPBackbone

        return CLIPBackbone.from_config(cfg, pretrained=pretrained)
    if cfg.name == "lite":
        from moecl.backbone.lite import LiteBackbone

        return LiteBackbone.from_config(cfg, pretrained=pretrained)
    raise AssertionError(f"BackboneConfig let an unknown backbone through: {cfg.name!r}")  # BackboneName lists both
