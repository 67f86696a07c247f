"""CLIP's zero-shot text classifier: one normalised class embedding averaged over prompt templates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moecl.backbone.base import Backbone
from moecl.device import full_precision


def text_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    task: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """(C, D) weights: per class, the normalised mean of the normalised embeddings of all its templates.

    `model` has tokenize(texts) and encode_text(tokens, task=...) (MoEAdapterModel) or is a bare Backbone, which
    only supports task=None. Computed without gradients (evaluation classifiers).
    """
    if not classnames or not templates:
        raise ValueError("text_classifier: need at least one class name and one template")
    if task is not None and isinstance(model, Backbone):
        raise ValueError("text_classifier: a bare Backbone has no tasks; pass task=None or the MoE model")
    device = next(iter(model.parameters())).device
    texts = [template.format(name) for name in classnames for template in templates]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = {k: v.to(device) for k, v in model.tokenize(texts[start : start + batch_size]).items()}
            emb = model.encode_text(tokens) if task is None else model.encode_text(tokens, task=task)
            chunks.append(F.normalize(full_precision(emb), dim=-1))
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)
