"""`moecl export`: a finished run as a model folder that Predictor.from_pretrained loads, written atomically."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from moecl import export as export_module
from moecl.cli import main
from moecl.config import BackboneConfig, RunConfig
from moecl.export import export_run, model_card
from moecl.params import count_parameters
from moecl.predict import Predictor

from .conftest import train_colour_run


@pytest.fixture(scope="module")
def finished_run(tiny_clip_dir, tmp_path_factory) -> tuple[Path, RunConfig, list[Path]]:
    out, cfg, tasks = train_colour_run(tmp_path_factory.mktemp("export"), tiny_clip_dir, 40)
    return out, cfg, sorted(p for t in tasks.values() for p in (t / "test").rglob("*.png"))


def test_metrics_params_are_what_moecl_params_counts(finished_run):
    """The trained learner (routers and fitted autoencoders of both tasks) and the meta-device count agree."""
    run, cfg, _ = finished_run
    assert json.loads((run / "metrics.json").read_text())["params"] == count_parameters(cfg, 2)


def test_export_then_from_pretrained_predicts_exactly_like_the_run(finished_run, tmp_path, capsys):
    run, cfg, images = finished_run
    out = tmp_path / "shared" / "colours-moe"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    pictures = [Image.open(p).convert("RGB") for p in images]
    expected = Predictor.from_run(run, cfg, device="cpu").predict(pictures)
    got = Predictor.from_pretrained(out, device="cpu").predict(pictures)
    assert got == expected  # same task, label and score (float equality) for every image
    assert Predictor.from_pretrained(str(out), device="cpu").predict(pictures[:2], task="cold") == Predictor.from_run(
        run, cfg, device="cpu"
    ).predict(pictures[:2], task="cold")


def test_the_exported_folder_holds_adapters_selector_stream_config_and_a_model_card(finished_run, tmp_path):
    run, cfg, _ = finished_run
    out = export_run(run, tmp_path / "model", cfg)
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "stream.json", "metrics.json"} <= names
    assert {"adapters/model.safetensors", "adapters/adapter_config.json"} <= names
    assert any(n.startswith("selector/") and n.endswith(".safetensors") for n in names)
    assert not any("checkpoints" in n or n.endswith(".jsonl") for n in names)  # nothing but what inference needs
    assert RunConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg
    card = (out / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: moecl\n")
    assert "warm (2 classes), cold (2 classes)" in card
    assert "| Transfer | Average | Last |" in card.replace(" | Forgetting", "")
    assert f"| {metrics['transfer']:.1f} | {metrics['average']:.1f} | {metrics['last']:.1f} |" in card
    assert "local folder" in card  # the tiny CLIP was loaded from disk: the card says the weights are needed
    assert "base_model" not in card


def test_the_model_card_of_a_lite_run_says_it_is_not_clip(finished_run):
    run, cfg, _ = finished_run
    lite = dataclasses.replace(cfg, backbone=BackboneConfig(name="lite", image_size=128))
    metrics = json.loads((run / "metrics.json").read_text())
    card = model_card(lite, metrics, json.loads((run / "stream.json").read_text()))
    assert "**The backbone is not CLIP.**" in card and "- clip" not in card
    hub = dataclasses.replace(cfg, backbone=BackboneConfig(name="clip", model="openai/clip-vit-base-patch16"))
    assert "base_model: openai/clip-vit-base-patch16" in model_card(hub, metrics, [])


def test_export_refuses_to_overwrite_and_replaces_with_overwrite(finished_run, tmp_path, capsys):
    run, _, _ = finished_run
    out = tmp_path / "model"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"
    assert main(["export", "--run", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left beside it
    assert main(["export", "--run", str(run), "--out", str(run / "inside")]) == 2


def test_a_failed_export_leaves_no_half_written_folder(finished_run, tmp_path, monkeypatch):
    run, cfg, _ = finished_run

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(run, tmp_path / "new", cfg)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "README.md").write_text("previous export")
    with pytest.raises(OSError, match="disk full"):
        export_run(run, old, cfg, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "README.md").read_text() == "previous export"


def test_from_pretrained_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Predictor.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="moecl export"):
        Predictor.from_pretrained(tmp_path)
