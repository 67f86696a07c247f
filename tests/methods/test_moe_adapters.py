"""MoE-Adapters on a tiny CLIP: evaluation reuse and bounded DDAS fits change cost, never results; the prototype
selector trains, saves, resumes and predicts like DDAS; selector.agnostic_classes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from moecl.config import RunConfig
from moecl.data.tasks import build_stream
from moecl.engine import Engine
from moecl.methods import build_learner
from moecl.selector.ddas import ZERO_SHOT, AutoSelector

COLOURS = {
    "warm": {"red": (220, 30, 30), "orange": (230, 140, 20)},
    "cold": {"blue": (30, 30, 220), "cyan": (20, 200, 220)},
    "green": {"lime": (60, 220, 40), "forest": (20, 110, 40)},
}


@pytest.fixture(scope="module")
def config(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory, image_folder) -> dict:
    root = tmp_path_factory.mktemp("moe_data")
    splits = {"train": 6, "test": 5}
    tasks = [
        {"name": n, "path": str(image_folder(root / n, c, splits, noise=40, size=(40, 36), seed=k))}
        for k, (n, c) in enumerate(COLOURS.items())
    ]
    grey = image_folder(root / "grey", {"grey": (120, 120, 120), "white": (215, 215, 215)}, {"train": 6})
    return {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"reference": str(grey), "hidden": 8, "iterations": 20, "reference_iterations": 20,
                     "batch_size": 4},
        "optim": {"iterations": 4, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2, "eval_batch_size": 4},
        "stream": {"name": "colours", "tasks": tasks},
        "data": {"workers": 0},
        "threads": 1,
    }  # fmt: skip


def _run(base: dict, out: Path, **sections: dict) -> Engine:
    merged = {**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}}
    cfg = RunConfig.from_dict(merged)
    stream = build_stream(cfg.stream, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine(build_learner(cfg, stream), stream, cfg, out, quiet=True)
        engine.state = engine.run()
    finally:
        torch.set_num_threads(threads)
    return engine


def _results(engine: Engine) -> tuple:
    state, learner = engine.state, engine.learner
    return state.matrix.to_dict(), state.agnostic.to_dict(), learner.routing


def test_evaluation_reuse_changes_cost_never_results(config, tmp_path):
    reused = _run(config, tmp_path / "on", data={"reuse_eval": True})
    fresh = _run(config, tmp_path / "off", data={"reuse_eval": False})
    assert _results(reused) == _results(fresh)
    assert reused.learner.metrics(reused.stream)["selector"]  # images really were routed
    cost, fresh_cost = reused.state.evaluation_cost(), fresh.state.evaluation_cost()
    assert cost["images"] == fresh_cost["images"] == 4 * 3 * 10  # 4 rows x 3 datasets x 10 test images
    # every image sent to zero-shot after the zero-shot row reused its embedding: its forward is counted once
    zero_shot_routed = sum(
        counts.get(ZERO_SHOT, 0) for learned, row in reused.learner.routing.items() if learned > 0 for counts in row.values()
    )
    assert zero_shot_routed > 0 and cost["reused"] == zero_shot_routed
    assert cost["forwards"] == cost["images"] - zero_shot_routed < fresh_cost["forwards"]
    assert fresh_cost["reused"] == 0


def test_what_cannot_change_is_computed_once(config, tmp_path, monkeypatch):
    import moecl.methods.base as base

    built: list[tuple] = []
    real_classifier = base.text_classifier

    def text_classifier(model, classnames, templates, task=None):
        built.append((tuple(classnames), task))
        return real_classifier(model, classnames, templates, task=task)

    columns: list[tuple[int, int]] = []  # (first task column computed, task AEs): per evaluation batch
    real_errors = AutoSelector.task_errors

    def task_errors(self, prepared, first=0):
        columns.append((first, self.num_tasks))
        return real_errors(self, prepared, first)

    monkeypatch.setattr(base, "text_classifier", text_classifier)
    monkeypatch.setattr(AutoSelector, "task_errors", task_errors)
    _run(config, tmp_path / "run")
    zero_shot = [b for b in built if b[1] is None]
    assert zero_shot and len(zero_shot) == len(set(zero_shot))  # each zero-shot classifier built once per run
    # each evaluation row computes only the column of the autoencoder trained since the previous row
    assert columns and all(first == tasks - 1 for first, tasks in columns)


def test_ddas_fits_streamed_through_the_loader_give_the_same_selector(config, tmp_path):
    held = _run(config, tmp_path / "held")
    streamed = _run(config, tmp_path / "streamed", selector={"memory_mb": 0.0})  # nothing held: every batch streamed
    a, b = held.learner.selector, streamed.learner.selector
    assert a.num_tasks == b.num_tasks == 3
    # the same images in the same AE batches; only the grouping of the feature passes differs (float rounding)
    assert torch.allclose(a.thresholds, b.thresholds, rtol=1e-3)
    assert torch.allclose(a.input_center, b.input_center, atol=1e-5)
    assert held.state.matrix.to_dict() == streamed.state.matrix.to_dict()


def test_a_given_feature_extractor_is_used_and_must_match_the_config(config, tiny_clip_dir):
    from moecl.backbone.clip import CLIPBackbone
    from moecl.methods.moe_adapters import MoEAdaptersLearner
    from moecl.moe.model import MoEAdapterModel
    from moecl.selector.features import ALEXNET_DIM, AlexNetFeatures, alexnet_trunk

    features = AlexNetFeatures(alexnet_trunk(seed=0))
    for name, expect_ok in (("alexnet", True), ("backbone", False)):
        cfg = RunConfig.from_dict({**config, "selector": {**config["selector"], "features": name}})
        model = MoEAdapterModel(CLIPBackbone.from_pretrained(str(tiny_clip_dir)), cfg.moe)
        if expect_ok:
            learner = MoEAdaptersLearner(model, cfg, features=features)
            assert learner.features is features and learner.selector.feature_dim == ALEXNET_DIM
            assert learner.eval_needs_pixels()
        else:
            with pytest.raises(ValueError, match="features 'alexnet' given for selector.features 'backbone'"):
                MoEAdaptersLearner(model, cfg, features=features)


def test_a_k_shot_autoencoder_counts_lr_epochs_over_the_whole_split(image_folder, tmp_path):
    from moecl.data.folder import open_folder_or_zip
    from moecl.data.sampling import limit_per_class
    from moecl.methods.moe_adapters import lr_epoch_rows

    full = open_folder_or_zip(image_folder(tmp_path / "d", COLOURS["warm"], {"train": 7}), "train")
    shots = limit_per_class(full, 2, seed=42)
    assert (len(full), len(shots)) == (14, 4)
    assert lr_epoch_rows(shots) == 14  # the split the 2-shot set was drawn from, as the official loader's length
    assert lr_epoch_rows(full) is None  # a whole split: its own passes
    assert lr_epoch_rows(shots.with_classnames(["a", "b"])) == 14


def test_the_official_ddas_rule_end_to_end(config, tmp_path, monkeypatch):
    """selector.decision batch + untrained_in_argmin + train_augment on a tiny CLIP: routers for every task from
    the start, one branch per evaluation batch, untrained slots in the errors, AEs read augmented batches."""
    from moecl.methods.moe_adapters import DatasetFeatures, MoEAdaptersLearner

    routes: list[list[int]] = []
    augmented: list[int] = []
    predict, read_augmented = MoEAdaptersLearner.predict, DatasetFeatures.read_augmented

    slots: set[tuple[int, int, int]] = set()

    def recording_predict(self, batch, stream, learned):
        pred = predict(self, batch, stream, learned)
        if pred.routed is not None and learned:
            routes.append(pred.routed.tolist())
            slots.add((learned, self.selector.num_tasks, self.selector.untrained_slots))
        return pred

    def counting_read_augmented(self, groups):
        augmented.append(len(groups))
        return read_augmented(self, groups)

    monkeypatch.setattr(MoEAdaptersLearner, "predict", recording_predict)
    monkeypatch.setattr(DatasetFeatures, "read_augmented", counting_read_augmented)
    selector = {"decision": "batch", "untrained_in_argmin": True, "train_augment": True, "threshold": 1.0}
    engine = _run(config, tmp_path / "run", selector=selector)
    learner = engine.learner
    assert learner.model.num_tasks == 3 and int(learner.selector.task_slots) == 3
    assert augmented == [20] * 4  # the reference AE and each task AE: every one of their 20 steps augmented
    assert routes and all(len(set(r)) == 1 for r in routes)  # one branch for the whole batch
    # the row after task 1 decided among 1 trained and 2 untrained task AEs, and so on
    assert slots == {(1, 1, 2), (2, 2, 1), (3, 3, 0)}
    batch = next(engine.data.evaluation_batches([(0, engine.stream.tasks[0].test)]))
    assert learner._test_errors(batch).shape == (len(batch), 3 + 1)  # 3 task columns and the reference
    # a learner restored from the run's checkpoint has the same slots, routers and errors (a resume)
    fresh = Engine(build_learner(engine.cfg, engine.stream), engine.stream, engine.cfg, tmp_path / "run", quiet=True)
    assert fresh.load_checkpoint() is not None
    assert fresh.learner.model.num_tasks == 3 and int(fresh.learner.selector.task_slots) == 3
    assert torch.equal(fresh.learner._test_errors(batch), learner._test_errors(batch))
    # an image an untrained slot wins goes through that task's (zero-initialised) router, image and text towers
    monkeypatch.setattr(learner.selector, "decide", lambda errors: torch.full((len(errors),), 2))
    with torch.no_grad():
        pred = learner.predict(batch, engine.stream, 1)
    assert pred.routed.tolist() == [2] * len(batch) and torch.isfinite(pred.logits).all()


def test_the_official_cil_evaluation_noisy_routers_and_training_transform(config, tmp_path):
    """moe.eval_noise + optim.eval_augment (protocol paper, CIL) on a tiny CIL stream: seeded, so a run is
    reproducible, and different from our evaluation (no noise, eval transform)."""
    cil = {
        "moe": {"num_experts": 2, "top_k": 2, "single_router": True, "freeze_per_task": 0},
        "selector": {"enabled": False},
        "stream": {"kind": "cil"},
    }
    official = {**cil, "moe": {**cil["moe"], "eval_noise": True}, "optim": {"eval_augment": True}}
    runs = [_run(config, tmp_path / f"paper{k}", **official) for k in range(2)]
    ours = _run(config, tmp_path / "ours", **cil)
    assert runs[0].state.matrix.to_dict() == runs[1].state.matrix.to_dict()
    assert runs[0].learner.reuse is False  # another crop in every row: nothing is kept by image key
    # evaluating never moves the global RNG: training is the same as ours, the same weights
    a, b = runs[0].learner.model.adapters.state_dict(), ours.learner.model.adapters.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = next(ours.data.evaluation_batches([(0, ours.stream.tasks[0].test)]))
    logits = []
    for engine in (runs[0], runs[0], ours):
        engine.learner.eval()
        engine.learner.begin_evaluation(3)  # seeds the evaluation noise of row 3
        with torch.no_grad():
            logits.append(engine.learner.predict(plain, engine.stream, 3).logits)
    assert torch.equal(logits[0], logits[1]) and not torch.equal(logits[0], logits[2])  # the noise, seeded


def test_a_row_requests_every_classifier_its_routes_use(config, tmp_path):
    engine = _run(config, tmp_path / "run")
    learner, stream, n = engine.learner, engine.stream, len(engine.stream.tasks)
    assert learner.eval_routes(0, 1) == [None] and learner.eval_routes(n, 0) == [None, *range(n)]  # DDAS: any
    requested = {r.cache_key for r in learner.row_classifiers(stream, n, range(n))}
    learner.invalidate_classifiers()
    engine.evaluate(engine.state, n)  # one process: built lazily, the classifiers the routed images use
    assert learner._classifiers and set(learner._classifiers) <= requested


# ----------------------------------------------------------------------------------------------------------------
# selector.kind "prototype": trained, saved, resumed, predicted with, and its task-agnostic label space
# ----------------------------------------------------------------------------------------------------------------
PROTOTYPE = {"kind": "prototype"}


@pytest.fixture(scope="module")
def prototype_run(config, tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Path]:
    """A finished tiny run with the prototype selector (config's selector.reference is set: it must go unused),
    with the outputs `moecl train` writes."""
    from moecl.results import finish_run

    out = tmp_path_factory.mktemp("prototype_run")
    engine = _run(config, out, selector=PROTOTYPE)
    finish_run(out, engine.cfg, engine.learner, engine.stream, engine.state, 0.0, engine.tracker)
    return engine, out


def test_a_prototype_run_trains_routes_and_saves_its_prototypes(prototype_run):
    import json

    from moecl.selector.prototype import PrototypeSelector

    engine, out = prototype_run
    learner = engine.learner
    assert engine.cfg.selector.reference is not None and learner._reference is None  # no reference images fitted
    assert isinstance(learner.selector, PrototypeSelector) and learner.selector.num_tasks == 3
    assert learner.features.squashed is False  # the backbone's own features, not DDAS's squashed ones
    assert learner.selector.extra_state()["prototypes_per_task"] == [2, 2, 2]  # one per class
    rates = learner.metrics(engine.stream)["selector"]
    assert set(rates) == {"task_selection_accuracy", "zero_shot_rate_unseen"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selector"] == pytest.approx(rates) and metrics["task_agnostic"] is not None
    assert (out / "selector" / "prototypes.safetensors").is_file()
    assert not (out / "selector" / "autoencoders.safetensors").exists()
    assert json.loads((out / "selector" / "selector.json").read_text())["kind"] == "prototype"
    assert "prototype (backbone features" in (out / "report.md").read_text()


def test_a_prototype_run_resumed_mid_task_ends_as_the_uninterrupted_one(config, prototype_run, tmp_path):
    from moecl.engine import Interrupted

    reference = prototype_run[0]
    cfg = RunConfig.from_dict({**config, "selector": {**config["selector"], **PROTOTYPE}})

    def engine(stop=None) -> Engine:
        stream = build_stream(cfg.stream, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        return Engine(build_learner(cfg, stream), stream, cfg, tmp_path / "run", quiet=True, stop_requested=stop)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checks = iter(range(100))  # read after the zero-shot row, after every step (4 a task) and every task
        with pytest.raises(Interrupted, match="stopped at task 2, step 2"):
            engine(stop=lambda: next(checks) == 7).run()  # the selector holds task 0's prototypes by then
        resumed = engine()
        resumed.state = resumed.run(resume=True)
    finally:
        torch.set_num_threads(threads)
    assert _results(resumed) == _results(reference)
    assert resumed.learner.metrics(resumed.stream) == reference.learner.metrics(reference.stream)
    # the selector's cost counters survive the interruption: every test image selected once per row, as uninterrupted
    assert resumed.learner.selector_time["selected"] == reference.learner.selector_time["selected"] > 0
    assert resumed.learner.selector_time["fit_s"] > 0
    for mine, theirs in (
        (resumed.learner.selector.state_dict(), reference.learner.selector.state_dict()),
        (resumed.learner.model.adapters.state_dict(), reference.learner.model.adapters.state_dict()),
    ):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def _test_batch(engine: Engine):
    """Every test image of every dataset of the run as one Batch (dataset 0), and their eval-transformed pixels."""
    from moecl.batches import Batch, frozen_prefix

    learner = engine.learner
    transform = learner.model.image_transform(False)
    images = [(task.test[i][0], task.test.key(i)) for task in engine.stream.tasks for i in range(len(task.test))]
    pixels = torch.stack([transform(img) for img, _ in images])
    with torch.no_grad():
        prefix = frozen_prefix(learner.model.image_prefix, pixels)
    labels = torch.zeros(len(images), dtype=torch.long)
    return Batch([key for _, key in images], labels, prefix, dataset=0), pixels


def test_predict_routes_per_image_as_the_learner_does(prototype_run):
    from moecl.predict import Predictor
    from moecl.selector.prototype import PrototypeSelector

    engine, out = prototype_run
    predictor = Predictor.from_run(out, engine.cfg)
    assert isinstance(predictor.selector, PrototypeSelector)
    batch, pixels = _test_batch(engine)
    with torch.no_grad():
        routed = engine.learner.route(batch, learned=3)
    names = [t.name for t in engine.stream.tasks]
    expected = [None if r == ZERO_SHOT else names[r] for r in routed.tolist()]
    together = predictor.predict_pixels(pixels)
    assert [r["task"] for r in together] == expected
    assert len(set(expected)) >= 2  # the images went to different branches: the comparison tested something
    alone = [predictor.predict_pixels(pixels[i : i + 1])[0] for i in range(len(pixels))]
    assert [(r["task"], r["label"]) for r in alone] == [(r["task"], r["label"]) for r in together]


@pytest.mark.parametrize("classes", ["routed", "union"])
def test_task_agnostic_classes_of_a_routed_image(prototype_run, classes):
    """selector.agnostic_classes "routed": an image sent to task r is classified among task r's classes only
    (every other union class at the lowest logit); "union": among every class, whatever its route."""
    from moecl.backbone import build_backbone
    from moecl.device import Placement
    from moecl.methods.moe_adapters import MoEAdaptersLearner

    engine, out = prototype_run
    cfg = engine.cfg.replace(selector=dataclasses.replace(engine.cfg.selector, agnostic_classes=classes))
    learner = MoEAdaptersLearner.from_outputs(out, cfg, build_backbone(cfg.backbone)).place(Placement.of("cpu")).eval()
    batch, _ = _test_batch(engine)
    routes = torch.tensor([0, 1, 2, ZERO_SHOT]).repeat(len(batch) // 4 + 1)[: len(batch)]
    learner.selector.decide = lambda errors: routes  # the routes this test looks at, whatever the distances
    with torch.no_grad():
        pred = learner.predict(batch, engine.stream, 3)
    union, lowest = pred.agnostic_logits, torch.finfo(pred.agnostic_logits.dtype).min
    assert pred.routed.tolist() == routes.tolist() and union.shape == (len(batch), 6) and pred.agnostic_offset == 0
    for r in (0, 1, 2):
        rows = routes == r
        block = torch.zeros(6, dtype=torch.bool)
        block[2 * r : 2 * r + 2] = True
        assert bool((union[rows][:, block] > lowest).all())
        if classes == "routed":
            assert bool((union[rows][:, ~block] == lowest).all())
        else:
            assert bool((union[rows][:, ~block] > lowest).all())
    assert bool((union[routes == ZERO_SHOT] > lowest).all())  # zero-shot images: the whole union either way
    # dataset 0's images routed to task 0: its union block is its task-aware logits
    torch.testing.assert_close(union[routes == 0][:, :2], pred.logits[routes == 0])


def test_the_selectors_own_cost_counts_its_state_fits_and_selections(config, prototype_run, tmp_path):
    import json

    from safetensors.torch import load_file

    from moecl.params import parameter_counts

    engine, out = prototype_run
    cost = json.loads((out / "checkpoints" / "report_extra.json").read_text())["selector_cost"]
    saved = load_file(out / "selector" / "prototypes.safetensors")
    assert cost["selector"] == "prototype selector" and cost["parameters"] == 0
    assert cost["state_bytes"] == sum(t.numel() * t.element_size() for t in saved.values()) > 0
    rows = engine.state.evaluation  # every test image of every row after the zero-shot one went through it
    assert cost["selected_images"] == sum(r["images"] for k, r in rows.items() if k != "0") > 0
    assert cost["fit_s"] > 0 and cost["select_us_per_image"] > 0
    report = (out / "report.md").read_text()
    assert "## Task selection (prototype selector)" in report and "| parameters | 0 |" in report
    ddas = _run(config, tmp_path / "ddas").learner  # DDAS: its autoencoders (tasks and reference) are its parameters
    assert ddas.selector_cost()["parameters"] == parameter_counts(ddas.parameter_parts())["selector"] > 0
