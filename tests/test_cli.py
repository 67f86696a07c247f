"""The CLI's happy paths on tiny configs (error paths: tests/test_cli_errors.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moecl.cli import main
from moecl.config import RunConfig, quickstart_config

ROOT = Path(__file__).resolve().parents[1]


def test_params_paper_config_counts(capsys):
    assert main(["params", "--config", str(ROOT / "configs/mtil/order1_full.yaml"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["moe"] == 51_059_712
    assert counts["per_tower"]["image"] + counts["per_tower"]["text"] == counts["moe"]
    assert main(["params", "--config", str(ROOT / "configs/cil/cifar100_10.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["moe"] == 4_027_392


def test_quickstart_yaml_is_the_quickstart_config():
    data = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    assert RunConfig.from_dict(data) == quickstart_config()


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_config_validates(config):
    RunConfig.from_dict(yaml.safe_load((ROOT / config).read_text()))


def test_data_list_json(capsys):
    assert main(["data", "list", "--json"]) == 0
    names = {row["name"] for row in json.loads(capsys.readouterr().out)}
    mtil = {"aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet"}
    assert mtil | {"stanford_cars", "sun397", "cifar10", "tinyimagenet"} <= names


@pytest.fixture
def tiny_yaml(tiny_clip_dir, tmp_path) -> Path:
    cfg = {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"enabled": False},
        "optim": {"iterations": 2, "batch_size": 4, "warmup_steps": 1, "eval_batch_size": 16},
        "stream": {"name": "quickstart", "max_train_per_class": 2, "max_test_per_class": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_dry_run_reports_stream(tiny_yaml, capsys):
    assert main(["train", "--config", str(tiny_yaml), "--dry-run"]) == 0
    out = capsys.readouterr().out
    summary, end = json.JSONDecoder().raw_decode(out)  # the stream summary, then the plan (moecl plan's table)
    assert summary["num_tasks"] == 4 and [t["name"] for t in summary["tasks"]][0] == "caltech101"
    assert "training passes" in out[end:] and "peak host memory" in out[end:]


def test_train_writes_the_run_directory_contract(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(tiny_yaml), "--out", str(out), "--quiet"]) == 0
    for name in ("config.yaml", "metrics.json", "log.jsonl", "report.md", "accuracy_matrix.png", "checkpoints"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("method", "tasks", "eval_datasets", "zero_shot", "accuracy_matrix", "transfer", "average", "last"):
        assert key in metrics
    assert len(metrics["accuracy_matrix"]) == 4 and all(len(r) == 4 for r in metrics["accuracy_matrix"])
    assert metrics["params"]["moe"] > 0 and metrics["time_s"] > 0
    # the resolved config has every default filled in and re-validates
    RunConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert "| caltech101 |" in (out / "report.md").read_text()
    assert main(["report", "--run", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["final_row"] == result["final_row_at_training"]  # re-evaluation reproduces the run
    assert main(["compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "comparison.png").exists()
