"""Continual fine-tuning through the engine: only the tower parameters move; checkpoints restore predictions."""

from __future__ import annotations

import torch


def test_finetune_runs_and_changes_only_tower_parameters(run_method):
    run = run_method("finetune")
    assert run.state.matrix.is_complete() and run.state.task == 2
    backbone = run.engine.learner.model
    names = {id(p): n for n, p in backbone.named_parameters()}
    tower = {names[id(p)] for p in backbone.tower_parameters("image")}
    after = backbone.state_dict()
    changed = {k for k in after if not torch.equal(after[k], run.before[k])}
    assert changed and changed <= tower  # something trained, and nothing outside the image tower
    assert "model.visual_projection.weight" in changed
    assert not any(k.startswith("model.text_model") for k in changed)  # finetune_text is off by default
    assert all(not p.requires_grad for n, p in backbone.named_parameters() if n not in tower)


def test_finetune_text_trains_the_text_tower_too(run_method):
    run = run_method("finetune", baselines={"finetune_text": True}, optim={"iterations": 1})
    backbone = run.engine.learner.model
    after = backbone.state_dict()
    changed = {k for k in after if not torch.equal(after[k], run.before[k])}
    assert any(k.startswith("model.text_model.encoder") for k in changed)
    assert "model.text_projection.weight" in changed
    assert not any(k.startswith("model.vision_model.embeddings") or k == "model.logit_scale" for k in changed)


def test_finetune_checkpoint_round_trip(run_method, round_trip, tmp_path):
    round_trip(run_method("finetune"), tmp_path)
