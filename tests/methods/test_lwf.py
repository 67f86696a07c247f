"""LwF: the distillation term vanishes at the previous weights and grows once they move; runs and resumes."""

from __future__ import annotations

import torch

from moecl.methods import build_learner


def test_distillation_is_zero_at_previous_weights_and_positive_after_a_step(
    make_config, make_engine, tmp_path, train_batch, sgd_step
):
    cfg = make_config("lwf")
    stream, engine = make_engine(cfg, tmp_path)
    learner, task = engine.learner, stream.tasks[0]
    learner.begin_task(0, task)
    batch = train_batch(learner, task)
    images = batch.prefix
    with torch.no_grad():
        assert learner.lwf_loss(images, learner.task_logits(images, 0), 0).item() == 0.0
    sgd_step(learner, batch, 0, task)
    with torch.no_grad():
        assert learner.lwf_loss(images, learner.task_logits(images, 0), 0).item() > 1e-6
    # the snapshot is a copy: training did not move it
    assert any(not torch.equal(p, learner.previous[n]) for n, p in learner.weights.params.items())


def test_previous_model_is_the_one_after_the_previous_task(run_method):
    run = run_method("lwf")
    assert run.state.matrix.is_complete()
    learner = run.engine.learner
    # after two tasks, `previous` holds the weights the second task started from (not the pretrained ones)
    pretrained = build_learner(run.cfg).weights.snapshot()
    assert any(not torch.equal(t, pretrained[n]) for n, t in learner.previous.items())
    assert any(not torch.equal(t, learner.previous[n]) for n, t in learner.weights.snapshot().items())


def test_lwf_checkpoint_round_trip(run_method, round_trip, tmp_path):
    round_trip(run_method("lwf"), tmp_path)


def test_lwf_mid_task_resume_gives_the_same_weights(run_method, resume_run):
    full = run_method("lwf").engine.learner.weights.snapshot()
    resumed = resume_run("lwf", task=1, step=1).learner.weights.snapshot()
    for n, t in full.items():
        torch.testing.assert_close(resumed[n], t, rtol=0, atol=1e-6)
