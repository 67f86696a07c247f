"""Predictor from a finished run: DDAS routing vs the true task, mixed batches, portability, the CLI's JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from moecl.backbone.tiny import write_tiny_clip
from moecl.cli import main
from moecl.config import RunConfig
from moecl.predict import Predictor

from .conftest import train_colour_run


@pytest.fixture(scope="module")
def finished_run(tiny_clip_dir, tmp_path_factory) -> tuple[Path, RunConfig, dict[str, list[Path]]]:
    out, cfg, tasks = train_colour_run(tmp_path_factory.mktemp("predict"), tiny_clip_dir, 60)
    return out, cfg, {n: sorted((p / "test").rglob("*.png")) for n, p in tasks.items()}


def _open(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def test_selector_prediction_equals_true_task_prediction_where_the_selector_is_right(finished_run):
    run, cfg, images = finished_run
    predictor = Predictor.from_run(run, cfg)
    right = 0
    for name, paths in images.items():
        auto = predictor.predict(_open(paths))
        told = predictor.predict(_open(paths), task=name)
        assert all(r["task"] == name for r in told)
        for a, t in zip(auto, told, strict=True):
            if a["task"] == name:
                right += 1
                assert a["label"] == t["label"] and a["score"] == pytest.approx(t["score"], abs=1e-5)
    assert right > 0, "the selector never chose the right task: the comparison tested nothing"


def test_a_mixed_batch_equals_one_image_at_a_time(finished_run):
    run, cfg, images = finished_run
    predictor = Predictor.from_run(run, cfg)
    paths = [p for pair in zip(images["warm"], images["cold"], strict=True) for p in pair]  # interleaved tasks
    batch = predictor.predict(_open(paths))
    alone = [predictor.predict(_open([p]))[0] for p in paths]
    assert [(r["task"], r["label"]) for r in batch] == [(r["task"], r["label"]) for r in alone]
    assert [r["score"] for r in batch] == pytest.approx([r["score"] for r in alone], abs=1e-5)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        predictor.predict(_open(paths[:1]), task="nope")


def test_adapters_load_onto_a_fresh_backbone_but_not_onto_another_architecture(finished_run, tmp_path):
    run, cfg, images = finished_run
    first = Predictor.from_run(run, cfg).predict(_open(images["warm"]))
    again = Predictor.from_run(run, cfg).predict(_open(images["warm"]))  # a second, independent fresh load
    assert first == again
    other = write_tiny_clip(tmp_path / "wider", hidden=48)
    wider = cfg.replace(backbone=dataclasses.replace(cfg.backbone, model=str(other)))
    with pytest.raises(ValueError, match="architecture"):
        Predictor.from_run(run, wider)


def test_cli_predict_json_on_a_folder(finished_run, capsys):
    run, _, images = finished_run
    folder = images["cold"][0].parent.parent  # test/<class>/...
    assert main(["predict", "--run", str(run), str(folder), "--json", "--quiet"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == sum(len(v) for v in images.values()) // 2
    assert all(set(r) == {"image", "task", "label", "score"} and 0 <= r["score"] <= 1 for r in results)
    assert {r["label"] for r in results} <= {"red", "orange", "blue", "cyan"}


def test_report_shows_where_images_went_including_datasets_not_learned_yet(finished_run):
    run, _cfg, images = finished_run
    extra = json.loads((run / "checkpoints" / "report_extra.json").read_text())
    unseen = extra["selector_unseen_routing"]
    assert list(unseen) == ["cold, after warm"]  # only "cold" is unseen, at the first checkpoint only
    assert sum(unseen["cold, after warm"].values()) == len(images["cold"])
    assert set(unseen["cold, after warm"]) <= {"warm", "zero-shot"}  # no branch for a task not learned yet
    md = (run / "report.md").read_text()
    assert "| dataset, checkpoint |" in md and "| cold, after warm |" in md
