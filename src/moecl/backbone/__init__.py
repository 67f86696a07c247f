"""Frozen dual-encoder backbones behind one interface (`Backbone`) and a factory from `BackboneConfig`."""

from __future__ import annotations

import typing

from moecl.backbone.base import Backbone, MoESite
from moecl.config import BackboneConfig, BackboneName

BACKBONES: tuple[str, ...] = typing.get_args(BackboneName)

__all__ = ["BACKBONES", "Backbone", "MoESite", "backbone_class", "build_backbone"]


def backbone_class(name: str) -> type[Backbone]:
    """The Backbone subclass of backbone.name (imported lazily: each pulls in its own heavy dependencies)."""
    if name == "clip":
        from moecl.backbone.clip import CLIPBackbone

        return CLIPBackbone
    if name == "lite":
        from moecl.backbone.lite import LiteBackbone

        return LiteBackbone
    raise AssertionError(f"BackboneConfig let an unknown backbone through: {name!r}")  # BackboneName lists both


def build_backbone(cfg: BackboneConfig, pretrained: bool = True) -> Backbone:
    """`pretrained=False` builds random weights from the architecture alone (no download; meta-device friendly)."""
    return backbone_class(cfg.name).from_config(cfg, pretrained=pretrained)
