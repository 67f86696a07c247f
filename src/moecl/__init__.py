"""moecl: continual learning of CLIP with Mixture-of-Experts adapters (MoE-Adapters4CL, CVPR 2024).

Public API (imported lazily, so `moecl --help` does not load torch):

    from moecl import RunConfig, build_backbone, build_stream, build_learner, run_stream, Predictor
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunConfig": "moecl.config",
    "quickstart_config": "moecl.config",
    "build_backbone": "moecl.backbone",
    "MoEAdapterModel": "moecl.moe.model",
    "AutoSelector": "moecl.selector.ddas",
    "Task": "moecl.data.tasks",
    "TaskStream": "moecl.data.tasks",
    "build_stream": "moecl.data.tasks",
    "build_learner": "moecl.methods",
    "Engine": "moecl.engine",
    "run_stream": "moecl.engine",
    "AccuracyMatrix": "moecl.metrics",
    "Predictor": "moecl.predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moecl' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
