"""Tiny streams and runs for the baseline tests: two 2-class colour tasks, a 3-class reference set, a tiny CLIP.

`run_method` runs a method end to end through the Engine once per (method, overrides) per session and hands the
same result to every test that asks, so the whole suite stays a few engine runs long.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moecl.batches import Batch
from moecl.config import RunConfig
from moecl.data.tasks import TaskStream, build_stream
from moecl.engine import Engine, Interrupted, RunState
from moecl.methods import build_learner


@dataclass
class Run:
    cfg: RunConfig
    stream: TaskStream
    engine: Engine
    state: RunState
    run_dir: Path
    before: dict[str, torch.Tensor]  # backbone state_dict before training


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one intra-op thread is ~8x faster than oversubscribed ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, image_folder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baseline_data")
    splits = {"train": 4, "test": 2}
    return {
        "warm": image_folder(root / "warm", {"red": (220, 30, 30), "orange": (230, 140, 20)}, splits),
        "cold": image_folder(root / "cold", {"blue": (30, 30, 220), "cyan": (20, 200, 220)}, splits),
        "reference": image_folder(
            root / "ref", {"tree": (20, 160, 40), "sky": (120, 170, 250), "sand": (230, 210, 150)}, {"train": 3}
        ),
    }


@pytest.fixture(scope="session")
def base_config(tiny_clip_dir: Path, tiny_data: dict[str, Path]) -> dict:
    return {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": False},
        "selector": {"enabled": False},
        "optim": {"iterations": 2, "batch_size": 4, "warmup_steps": 1, "lr": 1e-3, "eval_batch_size": 8},
        "baselines": {"zscl_reference": str(tiny_data["reference"])},
        "stream": {
            "name": "colours",
            "tasks": [
                {"name": "warm", "path": str(tiny_data["warm"])},
                {"name": "cold", "path": str(tiny_data["cold"])},
            ],
        },
    }


def config_for(base: dict, method: str, **sections: dict) -> RunConfig:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    data["method"] = method
    for key, values in sections.items():  # sections are merged; top-level scalars (checkpoint_every) replace
        data[key] = {**data.get(key, {}), **values} if isinstance(values, dict) else values
    return RunConfig.from_dict(data)


def fresh(cfg: RunConfig, run_dir: Path) -> tuple[TaskStream, Engine]:
    stream = build_stream(cfg.stream, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    return stream, Engine(build_learner(cfg, stream), stream, cfg, run_dir, quiet=True)


@pytest.fixture(scope="session")
def run_method(base_config: dict, tmp_path_factory: pytest.TempPathFactory):
    cache: dict[tuple, Run] = {}

    def run(method: str, **sections: dict) -> Run:
        key = (method, repr(sorted(sections.items())))
        if key not in cache:
            cfg = config_for(base_config, method, **sections)
            run_dir = tmp_path_factory.mktemp(f"run_{method}")
            stream, engine = fresh(cfg, run_dir)
            before = {k: v.clone() for k, v in engine.learner.model.state_dict().items()}
            cache[key] = Run(cfg, stream, engine, engine.run(), run_dir, before)
        return cache[key]

    return run


def predictions(learner, stream: TaskStream, learned: int) -> list[torch.Tensor]:
    """Logits of every test image of every dataset (eval transform) after `learned` tasks."""
    out = []
    transform = learner.model.image_transform(False)
    with torch.no_grad():
        for j, task in enumerate(stream.tasks):
            pixels = torch.stack([transform(task.test[i][0]) for i in range(len(task.test))])
            batch = Batch(
                [task.test.key(i) for i in range(len(task.test))],
                torch.tensor(task.test.labels),
                learner.model.image_prefix(pixels),
                dataset=j,
            )
            out.append(learner.predict(batch, stream, learned).logits)
    return out


def restored_learner(run: Run, tmp_path: Path):
    """A freshly built learner of the same config, restored from (a copy of) the run's latest checkpoint on disk."""
    copy = tmp_path / "restore"
    shutil.copytree(run.run_dir, copy)
    _, engine = fresh(run.cfg, copy)
    assert engine.load_checkpoint() is not None
    return engine.learner


def assert_round_trip(run: Run, tmp_path: Path) -> None:
    n = len(run.stream.tasks)
    expected = predictions(run.engine.learner, run.stream, n)
    got = predictions(restored_learner(run, tmp_path), run.stream, n)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# importlib import mode: test modules cannot import this file, so its helpers are handed out as fixtures
@pytest.fixture(scope="session")
def round_trip():
    return assert_round_trip


@pytest.fixture(scope="session")
def logits_of():
    return predictions


@pytest.fixture(scope="session")
def make_config(base_config: dict):
    return lambda method, **sections: config_for(base_config, method, **sections)


@pytest.fixture(scope="session")
def make_engine():
    return fresh


def first_batch(learner, task, n: int = 4, dataset: int = 0) -> Batch:
    """The first `n` training images of `task` (eval transform) as a Batch of stream dataset `dataset`."""
    transform = learner.model.image_transform(False)
    items = [task.train[i] for i in range(n)]
    pixels = torch.stack([transform(img) for img, _ in items])
    keys = [task.train.key(i) for i in range(n)]
    return Batch(keys, torch.tensor([label for _, label in items]), learner.model.image_prefix(pixels), dataset=dataset)


@pytest.fixture(scope="session")
def train_batch():
    return first_batch


@pytest.fixture(scope="session")
def sgd_step():
    """One optimiser step of the learner's own training loss on a batch (what the engine does per step)."""

    def step(learner, batch, index, task, lr: float = 1e-2) -> None:
        optimizer = torch.optim.AdamW(learner.trainable_parameters(index), lr=lr)
        loss = learner.training_loss(batch, index, task)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


@pytest.fixture(scope="session")
def resume_run(make_config, tmp_path_factory: pytest.TempPathFactory):
    """Run `method` with a checkpoint after every step, stop it after `step` steps of task `task`, then resume it
    with a freshly built learner and engine; returns the resumed engine (its learner holds the final weights)."""

    def run(method: str, task: int, step: int, **sections) -> Engine:
        cfg = make_config(method, checkpoint_every=1, **sections)
        run_dir = tmp_path_factory.mktemp(f"resume_{method}")
        _, engine = fresh(cfg, run_dir)
        learner = engine.learner
        engine.stop_requested = lambda: learner.task_index == task and learner.step == step
        with pytest.raises(Interrupted):
            engine.run()
        _, resumed = fresh(cfg, run_dir)
        resumed.run(resume=True)
        return resumed

    return run
