"""Shared baseline pieces: the backbone's tower parameters, functional calls under snapshots, label spaces."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moecl.accel import Collectives
from moecl.batches import Batch
from moecl.config import MoEConfig
from moecl.methods.common import TowerWeights, call_with, distill_kl
from moecl.moe.model import MoEAdapterModel


def _names(backbone, params) -> set[str]:
    lookup = {id(p): n for n, p in backbone.named_parameters()}
    return {lookup[id(p)] for p in params}


def test_clip_tower_parameters_cover_exactly_the_trainable_parts(tiny_backbone):
    image = _names(tiny_backbone, tiny_backbone.tower_parameters("image"))
    text = _names(tiny_backbone, tiny_backbone.tower_parameters("text"))
    assert not image & text
    assert all(
        n.startswith(("model.vision_model.encoder.", "model.vision_model.post_layernorm.", "model.visual_projection."))
        for n in image
    )
    assert "model.visual_projection.weight" in image and "model.vision_model.post_layernorm.weight" in image
    assert not any("embeddings" in n or "pre_layrnorm" in n for n in image)  # the cached frozen prefix
    assert text == {
        n for n, _ in tiny_backbone.named_parameters() if n.startswith(("model.text_model.", "model.text_projection."))
    }
    assert "model.logit_scale" not in image | text
    assert all(not p.requires_grad for p in tiny_backbone.parameters())  # asking does not unfreeze
    with pytest.raises(ValueError, match="unknown tower 'audio'"):
        tiny_backbone.tower_parameters("audio")


def test_tower_parameters_skip_installed_adapters_and_the_prefix_blocks(tiny_backbone):
    model = MoEAdapterModel(tiny_backbone, MoEConfig(num_experts=2, top_k=1, bottleneck=4, layers=(-1,)))
    image = _names(tiny_backbone, tiny_backbone.tower_parameters("image"))
    assert not any(".adapter." in n for n in image)
    assert not any(n.startswith("model.vision_model.encoder.layers.0.") for n in image)  # now in image_prefix
    assert any(n.startswith("model.vision_model.encoder.layers.1.") for n in image)
    assert model.num_tasks == 0


def test_call_with_uses_the_given_weights_and_leaves_the_module_alone(tiny_backbone):
    weights = TowerWeights(tiny_backbone, ["image"])
    prefix = tiny_backbone.image_prefix(torch.rand(2, 3, 32, 32))
    original = weights.snapshot()
    base = tiny_backbone.image_suffix(prefix)
    torch.testing.assert_close(call_with(tiny_backbone, original, "image_suffix", prefix), base, rtol=0, atol=0)
    moved = {n: t + 0.05 for n, t in original.items()}
    other = call_with(tiny_backbone, moved, "image_suffix", prefix)
    assert not torch.allclose(other, base)
    assert all(torch.equal(p, original[n]) for n, p in weights.params.items())  # parameters untouched
    weights.load(moved)
    torch.testing.assert_close(tiny_backbone.image_suffix(prefix), other)
    with pytest.raises(ValueError, match="missing tensors"):
        weights.load({})


def test_distill_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    assert distill_kl(a, a.clone(), 2.0).item() == 0.0
    assert distill_kl(a, a.flip(-1), 2.0).item() > 0.0


def test_label_spaces_mtil_and_cil(make_config, make_engine, tmp_path, train_batch):
    stream, engine = make_engine(make_config("finetune"), tmp_path / "mtil")
    learner = engine.learner
    batch = train_batch(learner, stream.tasks[0], n=3, dataset=1)
    with torch.no_grad():
        zero = learner.predict(batch, stream, 0)
        assert zero.logits.shape == (3, 2) and zero.agnostic_logits is None
        after = learner.predict(batch, stream, 1)  # dataset 1 not learned yet: union = task 0 + dataset 1
        assert after.agnostic_logits.shape == (3, 4) and after.agnostic_offset == 2
        torch.testing.assert_close(after.agnostic_logits[:, 2:], after.logits)
    cil_stream, cil_engine = make_engine(make_config("finetune", stream={"kind": "cil"}), tmp_path / "cil")
    with torch.no_grad():
        assert cil_engine.learner.predict(dataclasses.replace(batch, dataset=0), cil_stream, 1).logits.shape == (3, 2)
        assert cil_engine.learner.predict(batch, cil_stream, 2).logits.shape == (3, 4)
        assert cil_engine.learner.predict(batch, cil_stream, 0).agnostic_logits is None


def test_a_row_requests_the_classifiers_predict_uses_and_builds_them_alike(make_config, make_engine, tmp_path):
    for kind in ("mtil", "cil"):
        stream, engine = make_engine(make_config("finetune", stream={"kind": kind}), tmp_path / kind)
        learner, n = engine.learner, len(stream.tasks)
        for learned in range(n + 1):
            datasets = [j for j in range(n) if not (stream.class_incremental and learned > 0 and j >= learned)]
            requests = learner.row_classifiers(stream, learned, datasets)
            learner.invalidate_classifiers()
            with torch.no_grad():
                for j in datasets:
                    task = stream.tasks[j]
                    pixels = torch.stack([learner.model.image_transform(False)(task.test[0][0])])
                    batch = Batch([task.test.key(0)], torch.tensor([0]), learner.model.image_prefix(pixels), dataset=j)
                    learner.predict(batch, stream, learned)
            used = dict(learner._classifiers)
            assert set(used) == {r.cache_key for r in requests}, (kind, learned)
            learner.invalidate_classifiers()
            learner.build_classifiers(requests, Collectives())  # one process: every chunk encoded here
            for key, classifier in used.items():
                torch.testing.assert_close(learner._classifiers[key], classifier, rtol=0, atol=0)
