"""The prototype selector (selector.kind "prototype") on synthetic clustered features: routing, calibration,
per-image decisions, save/load by kind."""

import json

import pytest
import torch

from moecl.config import SelectorConfig
from moecl.selector.base import TaskSelector, load_selector
from moecl.selector.ddas import ZERO_SHOT, AutoSelector, TensorFeatures
from moecl.selector.prototype import PrototypeSelector

DIM = 64
CLASSES = 3  # per task
FAR = 99  # a "dataset" no task learned


def _centres(k: int) -> torch.Tensor:
    """(CLASSES, DIM) unit class directions of task k (random directions in 64-d: nearly orthogonal to others')."""
    c = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(500 + k))
    return c / c.norm(dim=1, keepdim=True)


def _task(k: int, per_class: int, sample_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone-like features (unnormalised, varying norms) of task k's classes, and their labels (class ids
    10 * k + c: labels are any integers, not 0..C-1)."""
    g = torch.Generator().manual_seed(sample_seed * 7919 + k)
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    x = _centres(k)[labels] + 0.06 * torch.randn(len(labels), DIM, generator=g)
    scale = 1 + 4 * torch.rand(len(labels), 1, generator=g)
    return x * scale, labels + 10 * k


def _cfg(**kw) -> SelectorConfig:
    return SelectorConfig(kind="prototype", reference=None, **kw)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _distances(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Independent cosine distance to the nearest prototype (float64)."""
    return 1 - (_unit(x.double()) @ _unit(prototypes.double()).t()).max(dim=1).values


@pytest.fixture(scope="module")
def fitted() -> PrototypeSelector:
    sel = PrototypeSelector(_cfg(), DIM, seed=3)
    for k in range(3):
        x, y = _task(k, 40, 0)
        assert sel.fit_task(x, labels=y) == k
    return sel.eval()


def _mixed(sample_seed: int, n: int = 6) -> torch.Tensor:
    x = torch.cat([_task(k, n, sample_seed)[0] for k in (0, FAR, 1, 2)])
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(sample_seed))]


def test_own_task_images_go_to_their_task_and_far_images_to_zero_shot(fitted):
    assert fitted.num_tasks == 3 and not fitted.has_reference and int(fitted.task_count) == 3
    assert fitted.owner.tolist() == [0] * CLASSES + [1] * CLASSES + [2] * CLASSES  # one prototype per class
    for k in range(3):
        chosen = fitted.select(_task(k, 30, 1)[0])
        assert chosen.dtype == torch.long
        assert set(chosen.tolist()) <= {k, ZERO_SHOT}
        assert (chosen == k).float().mean() >= 0.85  # the 0.95 quantile: a few own images fall past it
    assert (fitted.select(_task(FAR, 30, 1)[0]) == ZERO_SHOT).all()


def test_nothing_learned_routes_everything_to_zero_shot():
    sel = PrototypeSelector(_cfg(), DIM)
    x = _task(0, 3, 1)[0]
    assert sel.errors(x).shape == (9, 1) and sel.select(x).tolist() == [ZERO_SHOT] * 9


def test_the_threshold_is_the_quantile_of_the_heldout_images_distances():
    # one label per image: every image fitted on is its own prototype, so the held-out ones are those that
    # are not among the prototypes; the threshold must be the quantile of their distances to the prototypes
    x, _ = _task(0, 20, 0)
    n = len(x)
    sel = PrototypeSelector(_cfg(prototype_quantile=0.8), DIM, seed=7)
    sel.fit_task(x, labels=torch.arange(n))
    n_held = round(0.2 * n)  # the default heldout_fraction
    assert len(sel.prototypes) == n - n_held and sel.calibration[0, 3].item() == n_held
    similarity = _unit(x.double()) @ sel.prototypes.double().t()
    fitted_on = (similarity > 1 - 1e-5).any(dim=1)
    assert int(fitted_on.sum()) == n - n_held
    held = x[~fitted_on]
    expected = torch.quantile(_distances(held, sel.prototypes), 0.8)
    assert sel.thresholds[0].item() == pytest.approx(expected.item(), rel=1e-5)
    stats = dict(zip(("quantile", "mean", "std", "count"), sel.calibration[0].tolist(), strict=True))
    assert stats["mean"] == pytest.approx(_distances(held, sel.prototypes).mean().item(), rel=1e-5)
    assert stats["quantile"] == pytest.approx(sel.thresholds[0].item())


def test_given_heldout_features_calibrate_instead_of_a_share():
    x, y = _task(1, 30, 0)
    held, _ = _task(1, 7, 5)
    sel = PrototypeSelector(_cfg(), DIM)
    sel.fit_task(x, heldout=held, labels=y)
    assert sel.calibration[0, 3].item() == len(held) == 21  # the given images; every training image in a prototype
    expected_protos = torch.stack([_unit(_unit(x[y == c].double()).sum(0, keepdim=True))[0] for c in y.unique()])
    torch.testing.assert_close(sel.prototypes.double(), expected_protos, rtol=0, atol=1e-6)
    expected = torch.quantile(_distances(held, expected_protos), 0.95)
    assert sel.thresholds[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_without_labels_a_task_has_one_prototype_the_mean_direction():
    sel = PrototypeSelector(_cfg(), DIM)
    x0, x1 = _task(0, 20, 0)[0], _task(1, 20, 0)[0]
    sel.fit_task(x0, heldout=x0[:5])
    sel.fit_task(x1)
    assert sel.owner.tolist() == [0, 1] and sel.extra_state()["prototypes_per_task"] == [1, 1]
    mean_direction = _unit(_unit(x0.double()).sum(0, keepdim=True))[0]
    torch.testing.assert_close(sel.prototypes[0].double(), mean_direction, atol=1e-6, rtol=0)
    assert (sel.select(_task(1, 10, 2)[0]) != 0).all()


def test_a_task_of_one_image_is_calibrated_on_it():
    sel = PrototypeSelector(_cfg(), DIM)
    x = _task(0, 1, 0)[0][:1]
    sel.fit_task(x, labels=torch.tensor([4]))
    assert sel.calibration[0, 3].item() == 1 and sel.thresholds[0].item() == pytest.approx(0.0, abs=1e-6)


def test_per_image_decisions_equal_the_batch_decision(fitted):
    mixed = _mixed(3)
    together = fitted.select(mixed)
    one_by_one = torch.cat([fitted.select(mixed[i : i + 1]) for i in range(len(mixed))])
    assert torch.equal(together, one_by_one)
    assert {ZERO_SHOT, 0, 1, 2} <= set(together.tolist())
    errors = fitted.errors(mixed)
    assert errors.shape == (len(mixed), 3 + 1) and torch.isinf(errors[:, -1]).all()  # no reference: never wins
    torch.testing.assert_close(errors[:, 0].double(), _distances(mixed, fitted.prototypes[:CLASSES]), atol=1e-6, rtol=0)


def test_earlier_task_columns_never_change(fitted):
    x = _mixed(4)
    prepared = fitted.prepared(x)
    full = fitted.task_errors(prepared)
    for first in range(4):
        assert torch.equal(fitted.task_errors(prepared, first), full[:, first:])
    grown = PrototypeSelector(_cfg(), DIM, seed=3)
    grown.load_state_dict(fitted.state_dict())
    grown.fit_task(_task(FAR, 20, 0)[0])  # a fourth task, no labels
    assert torch.equal(grown.task_errors(grown.prepared(x))[:, :3], full)
    assert torch.equal(grown.thresholds[:3], fitted.thresholds)


class ChunkedSource:
    """A FeatureSource over a tensor that reads its rows in chunks of 7, and records every row it read."""

    def __init__(self, features: torch.Tensor):
        self.features = features
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.features)

    def read(self, groups):
        for g in groups:
            self.reads.extend(g.tolist())
            yield g, self.features[g]

    def rows(self, rows):
        return self.read(list(rows.split(7)))


def test_fitting_through_a_feature_source_equals_fitting_on_the_tensor():
    x, y = _task(2, 25, 0)
    on_tensor, on_source, on_wrapper = (PrototypeSelector(_cfg(), DIM, seed=3) for _ in range(3))
    on_tensor.fit_task(x, labels=y)
    source = ChunkedSource(x)
    on_source.fit_task(source, labels=y)
    on_wrapper.fit_task(TensorFeatures(x), labels=y)
    # every image read exactly once: the kept ones for the prototypes, the held-out ones for their distances
    assert sorted(source.reads) == list(range(len(x)))
    for other in (on_source, on_wrapper):
        torch.testing.assert_close(other.prototypes, on_tensor.prototypes, rtol=0, atol=1e-6)
        torch.testing.assert_close(other.thresholds, on_tensor.thresholds, rtol=1e-5, atol=1e-7)
        probe = _mixed(5)
        assert torch.equal(other.select(probe), on_tensor.select(probe))


def test_fitting_is_deterministic_for_a_seed_and_the_seed_picks_the_heldout_images():
    x, y = _task(0, 20, 0)
    states = []
    for global_seed, seed in ((0, 1), (1, 1), (0, 2)):
        torch.manual_seed(global_seed)
        sel = PrototypeSelector(_cfg(), DIM, seed=seed)
        sel.fit_task(x, labels=y)
        states.append(sel.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # the global RNG plays no part
    assert not torch.equal(states[0]["prototypes"], states[2]["prototypes"])  # another seed, another share


def test_state_dict_round_trip(fitted):
    fresh = PrototypeSelector(_cfg(), DIM)
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.num_tasks == 3 and fresh.owner.tolist() == fitted.owner.tolist()
    x = _mixed(6)
    assert torch.equal(fresh.errors(x), fitted.errors(x)) and torch.equal(fresh.select(x), fitted.select(x))
    with pytest.raises(ValueError, match="does not fit this selector"):
        PrototypeSelector(_cfg(), DIM + 1).load_state_dict(fitted.state_dict())


def test_allocate_gives_the_shapes_of_fitted_tasks():
    sel = PrototypeSelector(_cfg(), DIM).allocate(2, reference=True)
    assert sel.num_tasks == 2 and sel.prototypes.shape == (2, DIM) and sel.owner.tolist() == [0, 1]
    assert not sel.has_reference  # it uses no reference images, whatever is asked


def test_save_load_round_trip_and_dispatch_by_kind(fitted, tmp_path):
    fitted.save(tmp_path / "sel")
    meta = json.loads((tmp_path / "sel" / "selector.json").read_text())
    assert meta["kind"] == "prototype" and meta["config"]["kind"] == "prototype"
    assert meta["num_tasks"] == 3 and meta["prototypes_per_task"] == [CLASSES] * 3 and meta["feature_dim"] == DIM
    assert (tmp_path / "sel" / "prototypes.safetensors").is_file()
    assert not [p for p in (tmp_path / "sel").iterdir() if p.name.endswith(".tmp")]
    x = _mixed(7)
    for load in (load_selector, PrototypeSelector.load, TaskSelector.load):
        loaded = load(tmp_path / "sel")
        assert type(loaded) is PrototypeSelector and not loaded.training
        assert loaded.cfg == fitted.cfg and loaded.seed == 3
        state, ref = loaded.state_dict(), fitted.state_dict()
        assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
        assert torch.equal(loaded.select(x), fitted.select(x))
    with pytest.raises(ValueError, match="a 'prototype' selector, not 'ddas'"):
        AutoSelector.load(tmp_path / "sel")


def _tiny_ddas(tmp_path) -> tuple[AutoSelector, torch.Tensor]:
    cfg = SelectorConfig(reference=None, hidden=4, iterations=5, batch_size=16)
    sel = AutoSelector(cfg, DIM)
    x = torch.sigmoid(_task(0, 10, 0)[0])
    sel.fit_task(x)
    sel.save(tmp_path)
    return sel, x


def test_a_ddas_folder_loads_as_ddas_and_not_as_a_prototype_selector(tmp_path):
    _tiny_ddas(tmp_path)
    assert type(load_selector(tmp_path)) is AutoSelector
    with pytest.raises(ValueError, match="a 'ddas' selector, not 'prototype'"):
        PrototypeSelector.load(tmp_path)


def test_a_selector_saved_before_kinds_existed_loads_as_ddas(tmp_path):
    sel, x = _tiny_ddas(tmp_path)
    path = tmp_path / "selector.json"
    meta = json.loads(path.read_text())
    del meta["kind"]
    for key in ("kind", "prototype_quantile", "agnostic_classes"):  # config keys added with the kinds
        del meta["config"][key]
    path.write_text(json.dumps(meta))
    old = load_selector(tmp_path)
    assert type(old) is AutoSelector and old.cfg.kind == "ddas" and old.cfg == sel.cfg
    assert torch.equal(old.errors(x), sel.errors(x))


def test_bad_input_raises_clear_errors(fitted):
    sel = PrototypeSelector(_cfg(), DIM)
    with pytest.raises(ValueError, match="prototype selector task features: no feature vectors"):
        sel.fit_task(torch.zeros(0, DIM))
    with pytest.raises(ValueError, match=rf"prototype selector features must have shape \(N, {DIM}\), got \(5, 65\)"):
        sel.fit_task(torch.rand(5, DIM + 1))
    with pytest.raises(ValueError, match=r"^selector features must have shape \(N, F\), got \(5,\)"):
        sel.fit_task(torch.rand(5))
    with pytest.raises(ValueError, match="prototype selector: 3 labels for 5 feature vectors"):
        sel.fit_task(torch.rand(5, DIM), labels=torch.zeros(3, dtype=torch.long))
    assert sel.num_tasks == 0  # nothing half-fitted
    with pytest.raises(ValueError, match=rf"shape \(N, {DIM}\)"):
        fitted.select(torch.rand(2, DIM + 1))
    with pytest.raises(TypeError, match="uses no reference images"):
        sel.fit_reference(torch.rand(5, DIM))


def test_batch_decision_routes_a_whole_batch_by_its_mean_distances(fitted):
    per_batch = PrototypeSelector(_cfg(decision="batch"), DIM, seed=3)
    per_batch.load_state_dict(fitted.state_dict())
    # a test batch of task 1: per image a few fall past its threshold, per batch (the mean distance) none do
    batch = _task(1, 10, 4)[0]
    assert set(fitted.select(batch).tolist()) == {1, ZERO_SHOT}
    chosen = per_batch.select(batch)
    assert chosen.tolist() == [1] * len(batch)
    errors = fitted.errors(batch)
    assert chosen[0] == fitted.decide(errors.mean(dim=0, keepdim=True))[0]
    assert per_batch.select(_task(FAR, 2, 6)[0]).tolist() == [ZERO_SHOT] * (2 * CLASSES)
