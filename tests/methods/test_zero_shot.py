"""Zero-shot baseline: nothing trains, every row equals the zero-shot row."""

from __future__ import annotations

import torch


def test_zero_shot_rows_are_constant_and_equal_the_zero_shot_row(run_method):
    run = run_method("zero_shot")
    m = run.state.matrix
    assert m.is_complete()
    for i in range(len(run.stream.tasks)):
        assert m.row(i) == m.zero_shot
    assert run.engine.learner.trainable_parameters(0) == []
    after = run.engine.learner.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in run.before.items())
    assert not any(r["event"] == "step" for r in run.engine.log.records())


def test_zero_shot_checkpoint_round_trip(run_method, round_trip, tmp_path):
    run = run_method("zero_shot")
    tensors, _ = run.engine.learner.state_for_checkpoint()
    assert tensors == {}  # nothing changes, so nothing is saved
    round_trip(run, tmp_path)
