"""The shared loop on a tiny CLIP and two tiny synthetic tasks: rows, freezing, checkpoints, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moecl.batches import batch_indices
from moecl.config import RunConfig
from moecl.data.tasks import build_stream
from moecl.engine import Engine, cosine_lr
from moecl.methods import build_learner


@pytest.fixture
def tiny_run_config(tiny_clip_dir, tmp_path, image_folder) -> dict:
    def task(root: Path, colours: dict[str, tuple[int, int, int]]) -> Path:
        seed = len(colours) + sum(sum(c) for c in colours.values())
        return image_folder(root, colours, {"train": 6, "test": 3}, noise=40, size=(40, 36), seed=seed)

    a = task(tmp_path / "warm", {"red": (220, 30, 30), "orange": (230, 140, 20)})
    b = task(tmp_path / "cold", {"blue": (30, 30, 220), "cyan": (20, 200, 220)})
    return {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"enabled": False},
        "optim": {"iterations": 4, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2, "eval_batch_size": 8},
        "stream": {
            "name": "colours",
            "tasks": [{"name": "warm", "path": str(a)}, {"name": "cold", "path": str(b)}],
        },
    }


def _run(data: dict, out: Path) -> tuple[Engine, object]:
    cfg = RunConfig.from_dict(data)
    stream = build_stream(cfg.stream, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    learner = build_learner(cfg, stream)
    engine = Engine(learner, stream, cfg, out, quiet=True)
    return engine, engine.run()


def test_cosine_schedule_and_batches_are_pure_functions():
    assert cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(99, 100, 10, 1.0) < 0.01
    assert batch_indices(10, 4, 42, 1, 3) == batch_indices(10, 4, 42, 1, 3)
    epoch = sorted(i for s in range(3) for i in batch_indices(10, 4, 42, 0, s))
    assert epoch == list(range(10))  # one epoch covers every image once


def test_run_fills_matrix_freezes_experts_and_checkpoints(tiny_run_config, tmp_path):
    engine, state = _run(tiny_run_config, tmp_path / "run")
    m = state.matrix
    assert m.is_complete() and state.task == 2
    assert all(v is not None for v in m.zero_shot)
    assert m.transfer() is not None and m.average() is not None and m.last() is not None
    model = engine.learner.model
    assert model.num_tasks == 2
    frozen = [int(a.pool.frozen.sum()) for a in model.adapters.values()]
    assert all(1 <= f <= 4 for f in frozen)  # activate-freeze ran after each task
    ckpts = list((tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts, "a checkpoint after each task"
    records = engine.log.records()
    assert any(r["event"] == "eval" for r in records) and any(r["event"] == "step" for r in records)


def test_same_seed_same_matrix(tiny_run_config, tmp_path):
    _, a = _run(tiny_run_config, tmp_path / "a")
    _, b = _run(tiny_run_config, tmp_path / "b")
    assert a.matrix.to_dict() == b.matrix.to_dict()


def test_run_stream_through_the_public_api_equals_the_engine(tiny_run_config, tmp_path):
    import moecl

    _, state = _run(tiny_run_config, tmp_path / "engine")
    cfg = moecl.RunConfig.from_dict(tiny_run_config)
    stream = moecl.build_stream(cfg.stream, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    matrix = moecl.run_stream(moecl.build_learner(cfg, stream), stream, cfg, tmp_path / "api")
    assert isinstance(matrix, moecl.AccuracyMatrix)
    assert matrix.to_dict() == state.matrix.to_dict()
    with pytest.raises(AttributeError):
        moecl.no_such_name  # noqa: B018


def test_a_bf16_run_evaluates_under_autocast_and_the_selector_scores_in_fp32(tiny_run_config, tmp_path, monkeypatch):
    from moecl.selector.ddas import AutoSelector

    data = {**tiny_run_config, "optim": {**tiny_run_config["optim"], "precision": "bf16"}}
    data["selector"] = {"enabled": True, "reference": None, "hidden": 8, "iterations": 10, "batch_size": 4}
    seen = []
    real = AutoSelector.task_errors

    def task_errors(self, prepared, first=0):
        seen.append((prepared.dtype, torch.is_autocast_enabled('cpu')))
        return real(self, prepared, first)

    monkeypatch.setattr(AutoSelector, "task_errors", task_errors)
    engine, state = _run(data, tmp_path / "bf16")
    assert state.matrix.is_complete() and engine.learner.metrics(engine.stream)["selector"]
    assert seen and all(dtype == torch.float32 and not autocast for dtype, autocast in seen)
