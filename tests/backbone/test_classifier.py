import pytest
import torch

from moecl.backbone.classifier import text_classifier
from moecl.config import MoEConfig
from moecl.moe.model import MoEAdapterModel

CLASSES = ["cat", "dog", "red car"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{}"]


def test_mean_of_normalised_template_embeddings(tiny_backbone):
    weights = text_classifier(tiny_backbone, CLASSES, TEMPLATES)
    assert weights.shape == (3, 16)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        dog = tiny_backbone.encode_text(tiny_backbone.tokenize([t.format("dog") for t in TEMPLATES])).mean(0)
    torch.testing.assert_close(weights[1], dog / dog.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_classifier(tiny_backbone, CLASSES, TEMPLATES, batch_size=2), weights)


def test_task_classifier_uses_the_adapters(tiny_backbone):
    with pytest.raises(ValueError, match="bare Backbone has no tasks"):
        text_classifier(tiny_backbone, CLASSES, TEMPLATES, task=0)
    model = MoEAdapterModel(tiny_backbone, MoEConfig(num_experts=3, towers=("text",)))
    model.add_task()
    zero_shot = text_classifier(model, CLASSES, TEMPLATES)
    torch.testing.assert_close(zero_shot, text_classifier(tiny_backbone, CLASSES, TEMPLATES))
    for adapter in model.adapters.values():
        for expert in adapter.pool.experts:
            torch.nn.init.normal_(expert.up.weight)
    adapted = text_classifier(model, CLASSES, TEMPLATES, task=0)
    assert not adapted.requires_grad and (adapted - zero_shot).abs().max() > 1e-3
