"""ZSCL: distillation vs the initial model on reference images, the weight ensemble, runs, resumes."""

from __future__ import annotations

import torch

from moecl.methods.zscl import ZSCLLearner


def _learner(make_config, make_engine, tmp_path, **sections):
    stream, engine = make_engine(make_config("zscl", **sections), tmp_path)
    return stream, engine.learner


def test_distillation_is_zero_at_initial_weights_and_positive_after_a_step(
    make_config, make_engine, tmp_path, train_batch, sgd_step
):
    stream, learner = _learner(make_config, make_engine, tmp_path)
    task = stream.tasks[0]
    learner.begin_task(0, task)
    with torch.no_grad():
        assert abs(learner.zscl_loss(0, 0).item()) < 1e-6  # current == initial model
    sgd_step(learner, train_batch(learner, task), 0, task)
    with torch.no_grad():
        assert learner.zscl_loss(0, 0).item() > 1e-6
        assert learner.zscl_loss(0, 1).item() > 1e-6


def test_reference_batches_are_a_pure_function_of_seed_task_and_step(make_config, make_engine, tmp_path):
    _, learner = _learner(make_config, make_engine, tmp_path)
    batch = learner.reference_indices(1, 5)
    assert batch == learner.reference_indices(1, 5)
    assert len(batch) == min(learner.cfg.optim.batch_size, len(learner.reference)) == len(set(batch))
    draws = {tuple(learner.reference_indices(t, s)) for t in range(3) for s in range(5)}
    assert len(draws) > 1  # different (task, step) pairs draw different batches


def test_weight_ensemble_is_the_mean_of_the_snapshots(make_config, make_engine, tmp_path, train_batch):
    stream, built = _learner(make_config, make_engine, tmp_path)
    learner = ZSCLLearner(built.model, built.cfg, built.reference, we_every=2)
    task = stream.tasks[0]
    learner.begin_task(0, task)
    batch = train_batch(learner, task)
    optimizer = torch.optim.AdamW(learner.trainable_parameters(0), lr=1e-2)
    snapshots = []
    for step in range(3):  # snapshots at steps 0 and 2 (every 2) and at the end (after 3 steps)
        if step % 2 == 0:
            snapshots.append(learner.weights.snapshot())
        loss = learner.training_loss(batch, 0, task)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.at_step(0, step + 1)  # as the engine does after every batch
    snapshots.append(learner.weights.snapshot())
    learner.end_task(0, task)
    assert learner.ensemble_count == 3
    for n, t in learner.weights.snapshot().items():
        torch.testing.assert_close(t, torch.stack([s[n] for s in snapshots]).mean(0))


def test_zscl_runs_and_checkpoint_round_trip(run_method, round_trip, tmp_path):
    run = run_method("zscl")
    assert run.state.matrix.is_complete()
    round_trip(run, tmp_path)


def test_zscl_mid_task_resume_gives_the_same_weights(run_method, resume_run):
    full = run_method("zscl").engine.learner.weights.snapshot()
    resumed = resume_run("zscl", task=1, step=1).learner.weights.snapshot()
    for n, t in full.items():
        torch.testing.assert_close(resumed[n], t, rtol=0, atol=1e-6)
