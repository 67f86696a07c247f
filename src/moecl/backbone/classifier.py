"""CLIP's zero-shot text classifier: one normalised class embedding averaged over prompt templates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moecl.backbone.base import Backbone
from moecl.device import full_precision

PROMPT_BATCH = 256  # prompts per text-encoder forward


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class's prompts, class by class (each class's templates in order)."""
    return [template.format(name) for name in classnames for template in templates]


def prompt_chunks(n: int, batch_size: int = PROMPT_BATCH) -> list[slice]:
    """The text-encoder forwards of n prompts: consecutive slices of `batch_size`."""
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def encode_prompts(model: nn.Module, texts: Sequence[str], task: int | None = None) -> torch.Tensor:
    """(len(texts), D) normalised embeddings of `texts` in one forward, in full precision, without gradients."""
    if task is not None and isinstance(model, Backbone):
        raise ValueError("text_classifier: a bare Backbone has no tasks; pass task=None or the MoE model")
    device = next(iter(model.parameters())).device
    with torch.no_grad():
        tokens = {k: v.to(device) for k, v in model.tokenize(list(texts)).items()}
        emb = model.encode_text(tokens) if task is None else model.encode_text(tokens, task=task)
    return F.normalize(full_precision(emb), dim=-1)


def classifier_from_prompts(per_prompt: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """(C, D): per class, the normalised mean of its templates' rows of `per_prompt` (C * T rows, from `prompts`)."""
    return F.normalize(per_prompt.view(n_classes, n_templates, -1).mean(dim=1), dim=-1)


def text_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    task: int | None = None,
    batch_size: int = PROMPT_BATCH,
) -> torch.Tensor:
    """(C, D) weights: per class, the normalised mean of the normalised embeddings of all its templates.

    `model` has tokenize(texts) and encode_text(tokens, task=...) (MoEAdapterModel) or is a bare Backbone, which
    only supports task=None. Computed without gradients (evaluation classifiers).
    """
    if not classnames or not templates:
        raise ValueError("text_classifier: need at least one class name and one template")
    texts = prompts(classnames, templates)
    per_prompt = torch.cat([encode_prompts(model, texts[s], task) for s in prompt_chunks(len(texts), batch_size)])
    return classifier_from_prompts(per_prompt, len(classnames), len(templates))
