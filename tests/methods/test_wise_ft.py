"""WiSE-FT: exact interpolation endpoints, directly and through the engine."""

from __future__ import annotations

import torch

from moecl.methods import build_learner


def _towers(learner) -> dict[str, torch.Tensor]:
    return learner.weights.snapshot()


def test_interpolation_endpoints_are_exact(make_config):
    learner = build_learner(make_config("wise_ft"))
    zero_shot = _towers(learner)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for fine-tuned weights
        for p in learner.weights.params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    tuned = _towers(learner)
    learner.interpolate(1.0)
    assert all(torch.equal(_towers(learner)[n], t) for n, t in tuned.items())
    learner.interpolate(0.0)
    assert all(torch.equal(_towers(learner)[n], t) for n, t in zero_shot.items())
    learner.weights.load(tuned)
    learner.interpolate(0.25)
    for n, t in _towers(learner).items():
        torch.testing.assert_close(t, 0.75 * zero_shot[n] + 0.25 * tuned[n])


def test_alpha_one_is_finetune_and_alpha_zero_is_zero_shot_through_the_engine(run_method):
    finetune = run_method("finetune")
    one = run_method("wise_ft", baselines={"wise_alpha": 1.0})
    zero = run_method("wise_ft", baselines={"wise_alpha": 0.0})
    ft_weights = finetune.engine.learner.weights.snapshot()
    assert all(torch.equal(one.engine.learner.weights.snapshot()[n], t) for n, t in ft_weights.items())
    assert one.state.matrix.to_dict() == finetune.state.matrix.to_dict()
    after = zero.engine.learner.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in zero.before.items())  # back to the pretrained weights
    m = zero.state.matrix
    assert all(m.row(i) == m.zero_shot for i in range(len(zero.stream.tasks)))


def test_wise_ft_runs_and_checkpoint_round_trip(run_method, round_trip, tmp_path):
    run = run_method("wise_ft")
    assert run.state.matrix.is_complete()
    learner = run.engine.learner
    moved = [not torch.equal(t, learner.zero_shot_weights[n]) for n, t in learner.weights.snapshot().items()]
    assert any(moved)
    round_trip(run, tmp_path)
