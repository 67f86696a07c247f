"""Continual-learning methods, one Learner each, all driven by moecl.engine. `build_learner` is the thin factory."""

from __future__ import annotations

import importlib

from moecl.config import RunConfig
from moecl.data.tasks import TaskStream

# name -> "module:Class" for every config.MethodName (RunConfig rejects other names); modules import lazily so
# `moecl params` etc. stay fast
METHODS: dict[str, str] = {
    "moe_adapters": "moecl.methods.moe_adapters:MoEAdaptersLearner",
    "zero_shot": "moecl.methods.zero_shot:ZeroShotLearner",
    "finetune": "moecl.methods.finetune:FinetuneLearner",
    "lwf": "moecl.methods.lwf:LwFLearner",
    "wise_ft": "moecl.methods.wise_ft:WiseFTLearner",
    "zscl": "moecl.methods.zscl:ZSCLLearner",
}


def learner_class(name: str) -> type:
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_learner(cfg: RunConfig, stream: TaskStream | None = None, pretrained: bool = True):
    """Backbone from cfg.backbone, then the method's learner around it (reference data from cfg.selector)."""
    from moecl.backbone import build_backbone

    backbone = build_backbone(cfg.backbone, pretrained=pretrained)
    cls = learner_class(cfg.method)
    return cls.from_config(backbone, cfg, stream)
