import json

import pytest
import torch

from moecl.config import ConfigError, SelectorConfig
from moecl.selector.ddas import ZERO_SHOT, AutoSelector, confusion_counts, selection_report
from moecl.selector.features import squash

DIM = 128


def _distribution(k: int, n: int, sample_seed: int) -> torch.Tensor:
    """Backbone-like features of distribution k (k = 99: the reference's): squash() of embeddings that share a
    common direction plus a distribution-specific offset and a random 3-d manifold."""
    common = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1000 + k)
    center, basis = torch.randn(DIM, generator=g), 0.5 * torch.randn(3, DIM, generator=g)
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(sample_seed * 7919 + k))
    return squash(2.0 * common + center + z @ basis)


REF = 99


def _cfg(**kw) -> SelectorConfig:
    # lr_step_epochs large: with these few features the paper's decay would stop training after ~40 iterations
    base = {
        "hidden": 8,
        "iterations": 100,
        "reference_iterations": 100,
        "batch_size": 64,
        "lr": 0.01,
        "lr_step_epochs": 1000,
        "auto_margin": 2.0,
    }
    return SelectorConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def fitted() -> AutoSelector:
    sel = AutoSelector(_cfg(), DIM, seed=3)
    sel.fit_reference(_distribution(REF, 200, 0))
    for k in range(3):
        assert sel.fit_task(_distribution(k, 150, 0)) == k
    return sel.eval()


def test_learned_tasks_go_to_their_task_unseen_and_reference_go_to_zero_shot(fitted):
    assert fitted.num_tasks == 3 and fitted.has_reference
    for k in range(3):
        chosen = fitted.select(_distribution(k, 100, 1))
        assert chosen.dtype == torch.long
        assert (chosen == k).float().mean() >= 0.95
    unseen = fitted.select(_distribution(3, 100, 1))
    assert (unseen == ZERO_SHOT).float().mean() >= 0.95
    assert (fitted.select(_distribution(REF, 100, 1)) == ZERO_SHOT).float().mean() >= 0.95


def test_auto_thresholds_come_from_heldout_errors(fitted):
    cal = fitted.extra_state()["calibration"]
    assert [c["count"] for c in cal] == [30, 30, 30]  # 20% of 150 held out
    for t, c in enumerate(cal):
        assert fitted.thresholds[t].item() == pytest.approx(2.0 * c["quantile"])  # auto_margin 2
        assert c["mean"] <= c["quantile"]


def test_errors_layout_reference_last(fitted):
    x = _distribution(0, 5, 2)
    err = fitted.errors(x)
    assert err.shape == (5, 4)
    seen = fitted.prepare(x)  # centred on the reference
    assert torch.allclose(err[:, 0], fitted.task_autoencoders[0].reconstruction_error(seen))
    assert torch.allclose(err[:, -1], fitted.reference[0].reconstruction_error(seen))


def test_untrained_tasks_never_take_part():
    sel = AutoSelector(_cfg(iterations=100), DIM)
    assert (sel.select(_distribution(0, 4, 1)) == ZERO_SHOT).all()  # nothing learned yet
    sel.fit_task(_distribution(0, 100, 0))
    mixed = torch.cat([_distribution(k, 20, 1) for k in range(4)])
    chosen = sel.select(mixed)
    assert set(chosen.tolist()) <= {ZERO_SHOT, 0}
    assert sel.errors(mixed).shape == (80, 2)
    assert torch.isinf(sel.errors(mixed)[:, -1]).all()  # no reference AE: never wins


def test_decisions_are_per_sample(fitted):
    mixed = torch.cat([_distribution(k, 6, 3) for k in (0, 3, 1, REF, 2)])
    mixed = mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(0))]
    together = fitted.select(mixed)
    one_by_one = torch.cat([fitted.select(mixed[i : i + 1]) for i in range(len(mixed))])
    assert torch.equal(together, one_by_one)
    assert len(set(together.tolist())) >= 3


def test_numeric_threshold_applies_to_every_task():
    x = _distribution(0, 50, 1)
    strict = AutoSelector(_cfg(threshold=0.0, iterations=50), DIM)
    strict.fit_task(_distribution(0, 100, 0))
    assert (strict.select(x) == ZERO_SHOT).all()
    loose = AutoSelector(_cfg(threshold=1.0, iterations=50), DIM)
    loose.fit_task(_distribution(0, 100, 0))
    assert (loose.select(x) == 0).all()
    assert loose.thresholds.tolist() == [1.0]
    assert loose.extra_state()["calibration"][0]["count"] == 100  # no hold-out: calibrated on the training data


def test_explicit_heldout_is_used_for_calibration():
    sel = AutoSelector(_cfg(iterations=50), DIM)
    held = _distribution(0, 17, 5)
    sel.fit_task(_distribution(0, 60, 0), heldout=held)
    assert sel.calibration[0, 3].item() == 17
    q = torch.quantile(sel.task_autoencoders[0].reconstruction_error(held).double(), 0.99)
    assert sel.thresholds[0].item() == pytest.approx(2.0 * q.item(), rel=1e-6)


def test_fitting_is_deterministic_for_a_seed():
    states = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        sel = AutoSelector(_cfg(iterations=20, reference_iterations=20), DIM, seed=5)
        sel.fit_reference(_distribution(REF, 64, 0))
        sel.fit_task(_distribution(0, 64, 0))
        states.append(sel.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_state_dict_round_trip_restores_task_count_and_decisions(fitted):
    x = torch.cat([_distribution(k, 10, 4) for k in (0, 1, 2, 3, REF)])
    fresh = AutoSelector(_cfg(), DIM)
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.num_tasks == 3 and fresh.has_reference
    assert int(fitted.state_dict()["task_count"]) == 3
    assert torch.equal(fresh.errors(x), fitted.errors(x))
    assert torch.equal(fresh.select(x), fitted.select(x))
    assert torch.equal(fresh.thresholds, fitted.thresholds)


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save(tmp_path / "sel")
    meta = json.loads((tmp_path / "sel" / "selector.json").read_text())
    assert meta["num_tasks"] == 3 and meta["reference_column"] == "last" and meta["feature_dim"] == DIM
    assert not [p for p in (tmp_path / "sel").iterdir() if p.name.endswith(".tmp")]
    loaded = AutoSelector.load(tmp_path / "sel")
    x = torch.cat([_distribution(k, 10, 4) for k in (0, 1, 2, 3, REF)])
    assert loaded.cfg == fitted.cfg and not loaded.training
    assert torch.equal(loaded.errors(x), fitted.errors(x))
    assert torch.equal(loaded.select(x), fitted.select(x))


def test_load_errors_are_clear(tmp_path, fitted):
    with pytest.raises(FileNotFoundError, match="selector.json is missing"):
        AutoSelector.load(tmp_path)
    other = AutoSelector(_cfg(), DIM + 1)
    with pytest.raises(ValueError, match="does not fit this selector"):
        other.load_state_dict(fitted.state_dict())


def test_bad_input_and_config_raise_clear_errors():
    sel = AutoSelector(_cfg(), DIM)
    with pytest.raises(ValueError, match=rf"shape \(N, {DIM}\)"):
        sel.select(torch.rand(2, DIM + 1))
    with pytest.raises(ValueError, match="no feature vectors"):
        sel.fit_task(torch.rand(0, DIM))
    with pytest.raises(ConfigError, match="selector.threshold"):
        _cfg(threshold="sometimes")
    with pytest.raises(ConfigError, match="heldout_fraction"):
        _cfg(heldout_fraction=1.0)


def test_selection_report_and_confusion():
    selected = torch.tensor([0, 0, 1, ZERO_SHOT, ZERO_SHOT, 1])
    true = torch.tensor([0, 0, 0, ZERO_SHOT, ZERO_SHOT, ZERO_SHOT])
    rep = selection_report(selected, true, task_names=["a", "b"])
    assert rep["counts"] == {"zero-shot": 2, "a": 2, "b": 2}
    assert rep["task_selection_accuracy"] == pytest.approx(2 / 3)
    assert rep["zero_shot_rate_unseen"] == pytest.approx(2 / 3)
    assert selection_report(selected)["counts"] == {"zero-shot": 2, "0": 2, "1": 2}
    table = confusion_counts(selected[:3], "a", ["a", "b"])
    confusion_counts(selected[3:], "c", ["a", "b"], into=table)
    assert table == {"a": {"a": 2, "b": 1}, "c": {"zero-shot": 2, "b": 1}}


def test_auto_thresholds_are_relative_to_the_reference_error():
    sel = AutoSelector(_cfg(iterations=5, reference_iterations=5), DIM)
    sel.fit_reference(_distribution(REF, 32, 0))
    sel.fit_task(_distribution(0, 32, 0))
    assert sel.relative.tolist() == [True]
    sel.thresholds.fill_(0.5)
    errors = torch.tensor([[0.4, 1.0], [0.6, 1.0], [0.3, 0.5], [0.5, 0.4], [0.45, 0.5]])
    assert sel.decide(errors).tolist() == [0, ZERO_SHOT, ZERO_SHOT, ZERO_SHOT, ZERO_SHOT]
    sel.relative.fill_(False)  # numeric thresholds (the paper's) bound the raw error
    assert sel.decide(errors).tolist() == [0, ZERO_SHOT, 0, ZERO_SHOT, 0]


def test_backbone_features_are_centred_on_the_reference_only():
    sel = AutoSelector(_cfg(iterations=5, reference_iterations=5), DIM)
    x = _distribution(0, 8, 1)
    assert torch.equal(sel.prepare(x), x)  # nothing to centre on yet
    ref = _distribution(REF, 40, 0)
    sel.fit_reference(ref)
    center = sel.input_center.clone()
    assert torch.allclose(center, torch.logit(ref, eps=1e-6).mean(0))
    prepared = sel.prepare(x)
    assert prepared.shape == x.shape and bool(((prepared > 0) & (prepared < 1)).all())
    assert torch.allclose(prepared, squash(torch.logit(x, eps=1e-6) - center))
    sel.fit_task(_distribution(0, 40, 0))
    assert torch.equal(sel.input_center, center)  # task data never moves it
    paper = AutoSelector(_cfg(features="alexnet", iterations=5, reference_iterations=5), DIM)
    paper.fit_reference(ref)
    assert paper.input_center.numel() == 0 and torch.equal(paper.prepare(x), x)


def test_reference_negatives_raise_task_errors_on_reference_images_and_survive_save_load(tmp_path):
    ref, task = _distribution(REF, 200, 0), _distribution(0, 150, 0)
    plain = AutoSelector(_cfg(), DIM, seed=3)
    neg = AutoSelector(_cfg(negatives="reference", negative_weight=1.0), DIM, seed=3)
    for sel in (plain, neg):
        sel.fit_reference(ref)
        sel.fit_task(task)
    probe = _distribution(REF, 100, 1)  # unseen reference-like images
    ratio = {n: (s.errors(probe)[:, 0] / s.errors(probe)[:, 1]).mean() for n, s in (("plain", plain), ("neg", neg))}
    assert ratio["neg"] > ratio["plain"]  # the task AE explains reference-like images worse, as trained to
    assert (neg.select(_distribution(0, 50, 1)) == 0).float().mean() > 0.9  # its own task still goes to it
    assert plain.negative_features.numel() == 0 and neg.negative_features.shape == (200, DIM)
    neg.save(tmp_path)
    again = AutoSelector.load(tmp_path)
    assert torch.equal(again.negative_errors, neg.negative_errors)
    assert again.fit_task(_distribution(1, 150, 0)) == 1  # a resumed run keeps training with the negatives


def test_negatives_need_a_reference_and_a_known_kind():
    with pytest.raises(ConfigError, match="needs selector.reference"):
        _cfg(negatives="reference", reference=None)
    with pytest.raises(ConfigError, match="selector.negatives: 'others' is not one of reference"):
        _cfg(negatives="others")
    with pytest.raises(ConfigError, match="negative_weight"):
        _cfg(negatives="reference", negative_weight=-1.0)


def test_a_state_saved_before_reference_negatives_existed_still_loads(fitted):
    state = {k: v for k, v in fitted.state_dict().items() if not k.startswith("negative_")}
    again = AutoSelector(fitted.cfg, DIM, seed=3)
    again.load_state_dict(state)
    probe = _distribution(1, 20, 5)
    assert torch.equal(again.select(probe), fitted.select(probe)) and again.negative_features.numel() == 0


# ----------------------------------------------------------------------------------------------------------------
# Bounded fits: held in memory or streamed, the same autoencoders
# ----------------------------------------------------------------------------------------------------------------
class CountingSource:
    """A FeatureSource over a tensor that counts the rows every pass reads."""

    def __init__(self, features: torch.Tensor):
        self.features = features
        self.passes: list[int] = []

    def __len__(self) -> int:
        return len(self.features)

    def read(self, groups):
        groups = list(groups)
        self.passes.append(sum(len(g) for g in groups))
        for g in groups:
            yield g, self.features[g]

    def rows(self, rows):
        return self.read(list(rows.split(7)))  # chunks of the source's choosing


def _fit_both(cfg_kw: dict, n: int = 300) -> tuple[AutoSelector, AutoSelector, CountingSource, CountingSource]:
    ref, task = _distribution(REF, 200, 0), _distribution(0, n, 0)
    selectors, sources = [], []
    for memory_mb in (1024.0, 0.0):  # 0: nothing may be held, every batch is streamed
        sel = AutoSelector(_cfg(memory_mb=memory_mb, iterations=12, reference_iterations=10, batch_size=16, **cfg_kw), DIM)
        source = CountingSource(task)
        sel.fit_reference(CountingSource(ref))
        sel.fit_task(source)
        selectors.append(sel)
        sources.append(source)
    return selectors[0], selectors[1], sources[0], sources[1]


def test_a_streamed_fit_equals_a_held_one_and_reads_only_what_its_schedule_names():
    # alexnet-style features (no centring): the AE batches are the same numbers either way, so the same AEs
    held, streamed, held_src, streamed_src = _fit_both({"features": "alexnet"})
    a, b = held.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    n_held_out = round(0.2 * 300)
    # held: one pass over the images the schedule names plus the held-out ones, never the whole split (300)
    assert held_src.passes == [held_src.passes[0]] and held_src.passes[0] <= 12 * 16 + n_held_out < 300
    # streamed: the schedule's batches (12 x 16 rows), then the held-out images in chunks for calibration
    assert streamed_src.passes == [12 * 16, n_held_out]


def test_a_streamed_fit_of_centred_backbone_features_matches_the_held_one():
    held, streamed, *_ = _fit_both({"features": "backbone"})
    # the centre is a float64 running sum when streamed, a float32 mean when held: equal to rounding
    assert torch.allclose(held.input_center, streamed.input_center, atol=1e-5)
    assert torch.allclose(held.thresholds, streamed.thresholds, rtol=1e-3)
    probe = torch.cat([_distribution(0, 50, 9), _distribution(REF, 50, 9)])
    assert torch.equal(held.select(probe), streamed.select(probe))


def test_streamed_reference_negatives_are_a_sample_bounded_by_memory_mb():
    rows = 50
    cfg = _cfg(memory_mb=rows * DIM * 4 / 2**20, reference_iterations=10, batch_size=16, negatives="reference")
    sel = AutoSelector(cfg, DIM)
    sel.fit_reference(CountingSource(_distribution(REF, 200, 0)))  # its schedule reads 160 > 50 images: streamed
    assert sel.negative_features.shape == (rows, DIM) and len(sel.negative_errors) == rows
    held = AutoSelector(_cfg(reference_iterations=10, batch_size=16, negatives="reference"), DIM)
    held.fit_reference(_distribution(REF, 200, 0))
    assert len(held.negative_errors) == len(held.negative_features) <= 10 * 16  # what the reference AE trained on


def test_memory_mb_must_not_be_negative():
    with pytest.raises(ConfigError, match="memory_mb"):
        _cfg(memory_mb=-1.0)


# -- the official code's decision rule (protocol "paper") ------------------------------------------------------
def test_batch_decision_routes_a_whole_batch_by_its_mean_errors(fitted):
    per_image = AutoSelector(_cfg(), DIM, seed=3)
    per_image.load_state_dict(fitted.state_dict())
    per_batch = AutoSelector(_cfg(decision="batch"), DIM, seed=3)
    per_batch.load_state_dict(fitted.state_dict())
    # a test batch of task 1 with a few images of task 2 in it: per image they go apart, per batch all to task 1
    batch = torch.cat([_distribution(1, 12, 5), _distribution(2, 3, 5)])
    assert set(per_image.select(batch).tolist()) >= {1, 2}
    chosen = per_batch.select(batch)
    assert chosen.tolist() == [1] * 15
    # exactly the per-image rule applied to the batch's mean errors (the official MSE over the batch)
    errors = fitted.errors(batch)
    assert chosen[0] == per_image.decide(errors.mean(dim=0, keepdim=True))[0]
    # a batch of unseen images goes to zero-shot as a whole
    assert per_batch.select(_distribution(REF, 8, 6)).tolist() == [ZERO_SHOT] * 8


def test_untrained_autoencoders_take_part_in_the_argmin_at_their_initial_weights():
    cfg = _cfg(untrained_in_argmin=True, threshold=10.0)
    sel = AutoSelector(cfg, DIM, seed=4)
    sel.reserve_slots(3)  # a stream of three tasks
    sel.fit_reference(_distribution(REF, 100, 0))
    sel.fit_task(_distribution(0, 100, 0))
    assert sel.untrained_slots == 2
    x = _distribution(1, 5, 2)
    errors = sel.errors(x)
    assert errors.shape == (5, 1 + 2 + 1)  # task 0, slots of tasks 1 and 2, the reference
    for column, slot in ((1, 2), (2, 3)):  # the weights slot's AE starts from (task t: slot t + 1)
        expected = sel._new_autoencoder(slot).reconstruction_error(sel.prepared(x))
        assert torch.allclose(errors[:, column], expected)
    # an untrained slot that wins goes to its task index (the official code's untrained router) ...
    crafted = torch.tensor([[0.5, 0.2, 0.3, 0.9]])
    assert sel.decide(crafted).tolist() == [1]
    # ... unless the numeric threshold or the reference says zero-shot
    assert sel.decide(torch.tensor([[0.5, 0.2, 0.3, 0.1]])).tolist() == [ZERO_SHOT]
    tight = AutoSelector(_cfg(untrained_in_argmin=True, threshold=0.1), DIM, seed=4)
    tight.load_state_dict(sel.state_dict())
    assert tight.decide(crafted).tolist() == [ZERO_SHOT]
    # once the next task is trained its column is its trained AE, one untrained slot is left
    sel.fit_task(_distribution(1, 100, 0))
    assert sel.untrained_slots == 1 and sel.errors(x).shape == (5, 4)
    # the slots are state: a restored selector has them too
    again = AutoSelector(cfg, DIM, seed=4)
    again.load_state_dict(sel.state_dict())
    assert torch.equal(again.errors(x), sel.errors(x))
    # off (our default): no untrained columns whatever the stream
    default = AutoSelector(_cfg(threshold=10.0), DIM, seed=4)
    default.reserve_slots(3)
    default.load_state_dict(sel.state_dict())
    assert default.untrained_slots == 0 and default.errors(x).shape == (5, 3)


def test_official_rule_settings_are_checked():
    with pytest.raises(ConfigError, match="selector.untrained_in_argmin.*unless selector.threshold is a number"):
        _cfg(untrained_in_argmin=True, threshold="auto")
    with pytest.raises(ConfigError, match="selector.decision: 'dataset' is not one of image, batch"):
        _cfg(decision="dataset")
    with pytest.raises(ConfigError, match="selector.reference_shots: 0 is not allowed"):
        _cfg(reference_shots=0)


class AugmentingSource(CountingSource):
    """An ImageSource stand-in: `read_augmented` yields the features of another draw of the same images (a seeded
    offset per call and group), and records which rows every augmented step read."""

    def __init__(self, features: torch.Tensor):
        super().__init__(features)
        self.augmented: list[list[int]] = []

    def read_augmented(self, groups):
        for k, g in enumerate(groups):
            self.augmented.append(g.tolist())
            shift = 0.05 * torch.randn(self.features.shape[1], generator=torch.Generator().manual_seed(k))
            yield g, (self.features[g] + shift).clamp(0.01, 0.99)


def test_train_augment_reads_every_training_step_freshly_augmented():
    task = _distribution(0, 60, 0)
    cfg = _cfg(iterations=9, batch_size=16, threshold=0.5, train_augment=True)
    sel, plain = AutoSelector(cfg, DIM), AutoSelector(_cfg(iterations=9, batch_size=16, threshold=0.5), DIM)
    source = AugmentingSource(task)
    sel.fit_task(source)
    plain.fit_task(CountingSource(task))
    # one augmented read per autoencoder step, of the rows its schedule names (never held: each step is new)
    assert len(source.augmented) == 9 and all(len(rows) in (16, 60 - 3 * 16) for rows in source.augmented)
    a, b = sel.state_dict(), plain.state_dict()
    assert not torch.equal(a["task_autoencoders.0.encoder.0.weight"], b["task_autoencoders.0.encoder.0.weight"])
    # precomputed features cannot be augmented
    with pytest.raises(ValueError, match="train_augment needs the images"):
        AutoSelector(cfg, DIM).fit_task(task)
