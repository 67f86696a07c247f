from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from moecl.config import BackboneConfig, RunConfig, StreamConfig
from moecl.metrics import AccuracyMatrix
from moecl.report import LITE_LABEL, render_report, write_comparison, write_report

TASKS = ["digits", "clothing", "flowers"]
ZERO_SHOT = [11.0, 22.0, 33.0]
ROWS = [[91.25, 24.0, 35.0], [88.0, 77.5, 36.0], [86.0, 75.0, 66.75]]


def _metrics(method: str = "moe_adapters", rows=ROWS, **more) -> dict:
    m = AccuracyMatrix(TASKS)
    for j, v in enumerate(ZERO_SHOT):
        m.set_zero_shot(j, v)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            m.set(i, j, v)
    d = m.to_dict()
    out = {"method": method, **{k: d[k] for k in ("tasks", "eval_datasets", "zero_shot", "accuracy_matrix")}}
    out.update(transfer=d["transfer"], average=d["average"], last=d["last"], time_s=12.5, **more)
    return out


def _config(backbone: str = "lite", method: str = "moe_adapters") -> dict:
    return RunConfig(
        method=method,
        seed=7,
        backbone=BackboneConfig(name=backbone),
        stream=StreamConfig(name="my_stream"),
    ).to_dict()


def _png_ok(path: Path, min_w: int = 300, min_h: int = 150) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert min_w <= w <= 4000 and min_h <= h <= 4000, (w, h)
    return w, h


def test_write_report_full(tmp_path: Path) -> None:
    metrics = _metrics(
        backbone=LITE_LABEL,
        selector={"task_selection_accuracy": 0.875, "zero_shot_rate_unseen": 0.5},
        params={"trainable": 1_234_567, "total": 30_000_000, "moe": 1_000_000, "selector": 234_567},
        task_agnostic={"average": 70.25, "per_dataset": {"digits": 80.5, "clothing": 60.0}},
        evaluation={"images": 400, "forwards": 300, "reused": 100},
    )
    extra = {
        "timing": {"train": 30.0, "eval": 10.0},
        "selector_confusion": {"digits": {"digits": 40, "zero-shot": 2, "clothing": 1}, "clothing": {"clothing": 9}},
        "selector_unseen_routing": {"clothing, after digits": {"digits": 3, "zero-shot": 7}},
        "stream": {"kind": "mtil", "train_images": 300},
    }
    md_path, png_path = write_report(tmp_path, metrics, _config(), extra)
    assert md_path == tmp_path / "report.md" and png_path == tmp_path / "accuracy_matrix.png"
    md = md_path.read_text()
    # config summary
    assert "| method | moe_adapters |" in md and LITE_LABEL in md and "not the paper's results" in md
    assert "my_stream (mtil), 3 tasks: digits, clothing, flowers" in md and "| seed | 7 |" in md
    # matrix with the zero-shot row first, then one row per task; T/A/L
    assert "| zero-shot | 11.0 | 22.0 | 33.0 |" in md
    assert md.index("| zero-shot |") < md.index("| digits | 91.2 |") < md.index("| flowers | 86.0 | 75.0 | 66.8 |")
    assert "| Transfer | Average | Last | Forgetting |" in md
    assert f"| {metrics['transfer']:.1f} | {metrics['average']:.1f} | {metrics['last']:.1f} |" in md
    # selector statistics + confusion, task-agnostic block, cost
    assert "87.5%" in md and "50.0%" in md
    assert "| dataset | digits | clothing | zero-shot |" in md and "| digits | 40 | 1 | 2 |" in md
    assert "| dataset, checkpoint | digits | zero-shot |" in md and "| clothing, after digits | 3 | 7 |" in md
    assert "## Task-agnostic evaluation" in md and "| per_dataset.digits | 80.5 |" in md
    assert "| trainable | 1,234,567 | 1.23M |" in md
    assert "| image forwards run | 300 | 75.0% |" in md and "| forwards reused | 100 | 25.0% |" in md
    assert "| train | 30.0 | 75.0% |" in md and "| total | 40.0 | 100.0% |" in md
    assert "| train_images | 300 |" in md
    _png_ok(png_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_matrix.png", "report.md"]  # no temp files


def test_report_minimal_clip_run_omits_optional_sections(tmp_path: Path) -> None:
    config = _config(backbone="clip", method="finetune")
    write_report(tmp_path, _metrics("finetune"), config)
    md = (tmp_path / "report.md").read_text()
    assert "CLIP openai/clip-vit-base-patch16" in md and "not CLIP" not in md
    for absent in ("Task selection", "Task-agnostic", "## Cost", "| MoE |"):
        assert absent not in md
    _png_ok(tmp_path / "accuracy_matrix.png")


def test_report_of_partial_and_cil_runs(tmp_path: Path) -> None:
    partial = _metrics(rows=[ROWS[0], [None, None, None], [None, None, None]])
    md = render_report(partial, _config())
    assert "| clothing | – | – | – |" in md and "1 of 3 tasks done" in md
    cil = AccuracyMatrix(["s0", "s1"], kind="cil")
    cil.set_zero_shot(0, 40.0)
    cil.set_zero_shot(1, 41.0)
    cil.set(0, 0, 90.0)
    cil.set_seen(0, 90.0)
    cil.set(1, 0, 80.0)
    cil.set(1, 1, 84.0)
    cil.set_seen(1, 82.0)
    d = {k: v for k, v in cil.to_dict().items() if k != "kind"}  # as results.py writes metrics.json
    write_report(tmp_path, {"method": "moe_adapters", **d}, _config())
    md = (tmp_path / "report.md").read_text()
    assert "| Avg | Last | Forgetting |" in md and "| 86.0 | 82.0 | 10.0 |" in md
    _png_ok(tmp_path / "accuracy_matrix.png")


def _fake_run(path: Path, metrics: dict, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def test_write_comparison_of_two_runs(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "moe", _metrics(backbone=LITE_LABEL), _config())
    worse = [[r * 0.5 for r in row] for row in ROWS]
    b = _fake_run(tmp_path / "ft", _metrics("finetune", rows=worse), _config(method="finetune"))
    md_path, png_path = write_comparison([a, b], tmp_path / "cmp")
    md = md_path.read_text()
    assert "| run | method | backbone | stream | Transfer | Average | Last |" in md
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    assert f"| moe | moe_adapters | {LITE_LABEL} | my_stream | {ma['transfer']:.1f} | {ma['average']:.1f} |" in md
    assert f"| ft | finetune | {LITE_LABEL} | my_stream | {mb['transfer']:.1f} | {mb['average']:.1f} |" in md
    _png_ok(png_path)


def test_write_comparison_errors_name_the_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        write_comparison([tmp_path / "empty"], tmp_path / "cmp")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{")
    with pytest.raises(ValueError, match="metrics.json is not valid JSON"):
        write_comparison([bad], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def _selector_config(**selector) -> dict:
    from moecl.config import SelectorConfig

    stream, backbone = StreamConfig(name="my_stream"), BackboneConfig(name="lite")
    return RunConfig(seed=7, backbone=backbone, stream=stream, selector=SelectorConfig(**selector)).to_dict()


def test_report_names_the_selector_kind_and_how_task_agnostic_images_are_classified() -> None:
    metrics = _metrics(task_agnostic={"average": 70.25}, selector={"task_selection_accuracy": 0.9})
    ddas = render_report(metrics, _selector_config())
    routed = render_report(metrics, _selector_config(kind="prototype", prototype_quantile=0.9))
    union = render_report(metrics, _selector_config(kind="prototype", agnostic_classes="union"))
    assert "| selector | DDAS (backbone features, hidden 100, threshold auto, reference imagenet_sample) |" in ddas
    assert "| selector | prototype (backbone features, class prototypes, threshold: held-out quantile 0.9) |" in routed
    assert "DDAS picks the branch per image" in ddas and "prototype" not in ddas
    for md in (routed, union):
        assert "Task identity unknown at test time: the prototype selector picks the branch per image" in md
    assert "an image it sends to a task is classified among that task's classes" in routed
    assert "each image is classified among the classes of all tasks learned so far" in union
    assert "that task's classes" not in union
    given = render_report(metrics, _selector_config(enabled=False))
    assert "| selector | off (task identity given) |" in given and "Routes follow the given task identity" in given


def test_report_gives_the_selectors_own_cost_under_its_name() -> None:
    metrics = _metrics(selector={"task_selection_accuracy": 0.9, "zero_shot_rate_unseen": 0.8})
    cost = {"selector": "prototype selector", "parameters": 0, "state_bytes": 3 * 2**20, "fit_s": 0.25,
            "selected_images": 1200, "select_us_per_image": 51.4}  # fmt: skip
    md = render_report(metrics, _selector_config(kind="prototype"), {"selector_cost": cost})
    assert "## Task selection (prototype selector)" in md and "DDAS" not in md
    assert "| parameters | 0 |" in md and "| saved state | 3.0 MiB |" in md
    assert "| fit time (every task, and the reference if it has one) | 0.25 s |" in md
    assert "| selection time per test image (its selector features included) | 51.4 µs |" in md
    assert "| test images selected (every row after the first task) | 1,200 |" in md
    unselected = render_report(metrics, _selector_config(), {"selector_cost": {**cost, "select_us_per_image": None}})
    assert "## Task selection (DDAS)" in unselected and "its selector features included) | – |" in unselected
    assert "own cost" not in render_report(metrics, _selector_config())  # runs written before it: no cost table
