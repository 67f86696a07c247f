"""Experiment tracking: the files each backend writes hold the run's numbers (csv always; tensorboard and wandb
when their optional packages are installed), and logging: config validation."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moecl.config import ConfigError, LoggingConfig, RunConfig
from moecl.data.tasks import build_stream
from moecl.engine import Engine
from moecl.methods import build_learner
from moecl.results import finish_run
from moecl.tracking import CSVTracker, check_backends


@pytest.fixture(scope="module")
def tiny_config(tiny_clip_dir, tmp_path_factory, image_folder) -> dict:
    root = tmp_path_factory.mktemp("tracking")
    a = image_folder(root / "warm", {"red": (220, 30, 30), "orange": (230, 140, 20)}, {"train": 6, "test": 3}, noise=40)
    b = image_folder(root / "cold", {"blue": (30, 30, 220), "cyan": (20, 200, 220)}, {"train": 6, "test": 3}, noise=40)
    return {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"enabled": True, "iterations": 20, "reference": None, "hidden": 8, "batch_size": 4},
        "optim": {"iterations": 6, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2, "eval_batch_size": 8},
        "stream": {"name": "colours", "tasks": [{"name": "warm", "path": str(a)}, {"name": "cold", "path": str(b)}]},
    }


def _train(data: dict, out: Path, backends: tuple[str, ...]) -> tuple[Engine, dict]:
    cfg = RunConfig.from_dict({**data, "logging": {"backends": list(backends), "every": 2}})
    stream = build_stream(cfg.stream, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    learner = build_learner(cfg, stream)
    engine = Engine(learner, stream, cfg, out, quiet=True)
    state = engine.run()
    metrics = finish_run(out, cfg, learner, stream, state, 0.0, engine.tracker)
    return engine, metrics


@pytest.fixture(scope="module")
def csv_run(tiny_config, tmp_path_factory) -> tuple[Path, Engine, dict]:
    out = tmp_path_factory.mktemp("csv") / "run"
    engine, metrics = _train(tiny_config, out, ("jsonl", "csv"))
    return out, engine, metrics


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_steps_are_the_logged_steps(csv_run):
    out, engine, _ = csv_run
    logged = [r for r in engine.log.records() if r["event"] == "step"]
    rows = _rows(out / "csv" / "steps.csv")
    assert [(int(r["task"]), int(r["step"])) for r in rows] == [(r["task"], r["step"]) for r in logged]
    assert [(r["task"], r["step"]) for r in logged] == [(0, 0), (0, 2), (0, 4), (0, 5), (1, 0), (1, 2), (1, 4), (1, 5)]
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in logged])
    assert [float(r["lr"]) for r in rows] == pytest.approx([r["lr"] for r in logged])
    assert [int(r["global_step"]) for r in rows] == [1, 3, 5, 6, 7, 9, 11, 12]  # steps done; 6 per task


def test_csv_matrix_summary_and_task_statistics(csv_run):
    out, engine, metrics = csv_run
    with open(out / "csv" / "accuracy_matrix.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["after_task", "warm", "cold"]
    assert [r[0] for r in table[1:]] == ["zero-shot", "warm", "cold"]
    assert [float(v) for v in table[1][1:]] == pytest.approx(metrics["zero_shot"], abs=1e-4)
    cells = [float(v) for r in table[2:] for v in r[1:]]
    assert cells == pytest.approx([v for r in metrics["accuracy_matrix"] for v in r], abs=1e-4)
    summary = {r["metric"]: float(r["value"]) for r in _rows(out / "csv" / "summary.csv")}
    for key in ("transfer", "average", "last"):
        assert summary[key] == pytest.approx(metrics[key])
    assert summary["selector/task_selection_accuracy"] == pytest.approx(metrics["selector"]["task_selection_accuracy"])

    stats = _rows(out / "csv" / "task_stats.csv")
    model = engine.learner.model
    sites = list(model.adapters)
    assert {int(r["learned"]) for r in stats} == {1, 2}
    final_frozen = {r["name"]: float(r["value"]) for r in stats if r["learned"] == "2" and r["index"] == ""}
    for site in sites:  # frozen counts after the last task are the model's
        assert final_frozen[f"experts/{site}/frozen"] == int(model.adapters[site].pool.frozen.sum())
    for learned in ("1", "2"):
        for site in sites:
            usage = [int(r["value"]) for r in stats if r["learned"] == learned and r["name"] == f"experts/{site}/usage"]
            assert len(usage) == 4 and sum(usage) > 0  # 4 experts; samples were routed during the task
    assert "selector/task_selection_accuracy" in {r["name"] for r in stats if r["learned"] == "2"}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval" for r in records)  # jsonl is still written next to the other backends


def test_csv_resume_drops_rows_past_the_checkpoint(tmp_path):
    t = CSVTracker(tmp_path)
    for g in range(6):
        t.step(g // 3, g % 3, g + 1, {"loss": 1.0 / (g + 1), "lr": 0.1})
    t.task_end(1, 3, {"scalars": {"a": 1}})
    t.task_end(2, 6, {"scalars": {"a": 2}})
    CSVTracker(tmp_path, resume=(1, 4))  # the checkpoint: 1 task done, global step 4
    assert [int(r["global_step"]) for r in _rows(tmp_path / "steps.csv")] == [1, 2, 3, 4]
    assert [r["learned"] for r in _rows(tmp_path / "task_stats.csv")] == ["1"]
    CSVTracker(tmp_path)  # a fresh run: nothing left
    assert not (tmp_path / "steps.csv").exists()


def test_tensorboard_event_file_holds_the_values(tiny_config, tmp_path):
    pytest.importorskip("tensorboard", reason="optional extra moecl[tensorboard] not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine, metrics = _train(tiny_config, tmp_path / "run", ("tensorboard",))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    logged = [r for r in engine.log.records() if r["event"] == "step"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 3, 5, 6, 7, 9, 11, 12]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    warm = acc.Scalars("accuracy/warm")
    assert [e.step for e in warm] == [0, 6, 12]  # zero-shot, after each task (global steps)
    assert [e.value for e in warm] == pytest.approx([metrics["zero_shot"][0]] + [r[0] for r in metrics["accuracy_matrix"]])
    assert acc.Scalars("results/last")[0].value == pytest.approx(metrics["last"])
    site = next(iter(engine.learner.model.adapters))
    hist = acc.Histograms(f"experts/{site}/usage")
    assert len(hist) == 2 and hist[0].histogram_value.num > 0
    frozen = acc.Scalars(f"experts/{site}/frozen")
    assert frozen[-1].value == int(engine.learner.model.adapters[site].pool.frozen.sum())


def _wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log: 32 KiB blocks of chunks with a
    7-byte header each, after a 7-byte file header); this wandb has no reader of its own."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # "a/b" keys are stored split


def test_wandb_offline_run_is_written(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="optional extra moecl[wandb] not installed")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    engine, metrics = _train(tiny_config, tmp_path / "run", ("wandb",))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history, summary = [], {}
    for record in _wandb_records(next(runs[0].glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    logged = [r for r in engine.log.records() if r["event"] == "step"]
    steps = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert [s for s, _ in steps] == [1, 3, 5, 6, 7, 9, 11, 12]
    assert [v for _, v in steps] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    warm = [h["accuracy/warm"] for h in history if "accuracy/warm" in h]
    assert warm == pytest.approx([metrics["zero_shot"][0]] + [r[0] for r in metrics["accuracy_matrix"]])
    for key in ("transfer", "average", "last"):
        assert summary[key] == pytest.approx(metrics[key])
    (table,) = runs[0].glob("files/media/table/results/accuracy_matrix*.table.json")
    rows = json.loads(table.read_text())["data"]
    assert [r[1:] for r in rows] == [metrics["zero_shot"], *metrics["accuracy_matrix"]]


def test_logging_config_validates_itself():
    assert RunConfig().logging == LoggingConfig(backends=("jsonl",), every=10)
    cfg = RunConfig.from_dict({"logging": {"backends": ["csv", "tensorboard"], "every": 5}})
    assert cfg.logging.backends == ("csv", "tensorboard") and cfg.logging.every == 5
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        LoggingConfig(backends=("tensorbord",))
    with pytest.raises(ConfigError, match="twice"):
        LoggingConfig(backends=("csv", "csv"))
    with pytest.raises(ConfigError, match="every"):
        LoggingConfig(every=0)
    with pytest.raises(ConfigError, match="wandb_mode"):
        LoggingConfig(wandb_mode="cloud")
    # where a run reports is not what it computes: a resumed run may change it
    assert cfg.results_part() == RunConfig().results_part()


def test_a_missing_optional_backend_is_named_before_anything_loads(monkeypatch):
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"moecl\[wandb\]"):
        check_backends(LoggingConfig(backends=("csv", "wandb")))
    check_backends(LoggingConfig(backends=("jsonl", "csv")))



def test_a_killed_and_resumed_run_writes_the_csv_files_of_an_uninterrupted_one(tiny_clip_dir, tmp_path, image_folder):
    import yaml

    from .test_resume import finish, tiny_config, train

    has_tensorboard = importlib.util.find_spec("tensorboard") is not None  # also checked when installed
    backends = ["csv", "tensorboard"] if has_tensorboard else ["csv"]
    data = tiny_config(tiny_clip_dir, tmp_path / "data", image_folder, logging={"backends": backends, "every": 1})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    assert finish(train(config, tmp_path / "whole"))[0] == 0
    killed = tmp_path / "killed"
    code, _ = finish(train(config, killed, kill_at="task1-step3"))  # past the checkpoint at task 1, step 2
    assert code != 0 and len(_rows(killed / "csv" / "steps.csv")) == 7  # 4 + 3 steps; step 2 of task 1 is past it
    code, err = finish(train(config, killed, "--resume"))
    assert code == 0, err
    for name in ("steps.csv", "accuracy_matrix.csv", "task_stats.csv", "summary.csv"):
        whole, resumed = _rows(tmp_path / "whole" / "csv" / name), _rows(killed / "csv" / name)
        if name == "summary.csv":  # the wall time differs
            whole, resumed = ([r for r in rows if r["metric"] != "time_s"] for rows in (whole, resumed))
        assert resumed == whole, name
    if has_tensorboard:  # purge_step hides the killed run's events past the checkpoint; none are lost
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
            acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
            acc.Reload()
            tags = [t for t in acc.Tags()["scalars"] if t != "results/time_s"]
            return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}

        assert scalars(killed) == scalars(tmp_path / "whole")
