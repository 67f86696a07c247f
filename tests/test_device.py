"""Device placement without a GPU: the `device` setting, `--device` errors, and a consistency check of everything a
learner touches.

The consistency check places the learner in float64 (`Placement(cpu, float64)`): the engine and the Predictor
hand every tensor to the learner through that placement (batches, restored checkpoints, prompt tokens), and the
learner creates its own tensors where its parameters are. Any floating tensor that still arrives as float32 came
around the placement, and on a GPU it would sit on the wrong device. A TorchDispatchMode sees every aten op of a
whole run (training steps, DDAS fits, evaluation rows with the selector, checkpoints) and of a prediction, and
fails on the first op that reads a float32 tensor (only moving a tensor, `_to_copy` / `copy_`, may; 0-dim
tensors are exempt as on CUDA). The negative
control feeds unplaced batches and must be caught.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moecl.cli import main
from moecl.config import ConfigError, RunConfig
from moecl.data.tasks import build_stream
from moecl.device import Placement, resolve_device
from moecl.engine import Engine
from moecl.methods import build_learner

FLOAT64 = Placement(torch.device("cpu"), torch.float64)
# moving a tensor, and receiving one from a DataLoader worker (rebuilt from shared memory)
# Ops that may see a float32 tensor: moving one, receiving one from a DataLoader worker (rebuilt from shared
# memory), and the in-place fills that initialise a new module's parameters (written, never read) before the
# module is moved to the learner's placement, as a new router or autoencoder is.
MOVES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
for packet in (torch.ops.aten.set_, torch.ops.aten.uniform_, torch.ops.aten.normal_, torch.ops.aten.zero_,
               torch.ops.aten.fill_):  # fmt: skip
    MOVES |= {getattr(packet, name) for name in packet.overloads()}
LOW = (torch.float32, torch.float16, torch.bfloat16)
HOST_IO = ("moecl/checkpoint.py",)  # reading a checkpoint file builds host tensors; the engine then places them


class Unplaced(AssertionError):
    """A tensor reached the learner without going through its placement."""


def _low_precision(t) -> bool:
    # 0-dim tensors are exempt, as CUDA kernels accept them from the host as scalars (e.g. fused AdamW's float32
    # step counters, which torch keeps in float32 whatever the parameters' dtype)
    return isinstance(t, torch.Tensor) and t.dtype in LOW and t.dim() > 0


class UnplacedTensorCheck(TorchDispatchMode):
    """Raises Unplaced at the first aten op (other than a move) that reads a float32/16 tensor. Forked DataLoader
    workers inherit the mode; they only decode images (on the host, by design), so they are not checked, nor is
    reading a checkpoint file (HOST_IO)."""

    def __init__(self):
        super().__init__()
        self.pid = os.getpid()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if os.getpid() == self.pid and func not in MOVES:
            self.ops += 1
            low = [t for t in tree_leaves((args, kwargs)) if _low_precision(t)]
            stack = traceback.extract_stack() if low else []
            if low and not any(f.filename.endswith(HOST_IO) for f in stack):
                where = [f"{f.filename}:{f.lineno} {f.name}" for f in stack if "moecl" in f.filename]
                raise Unplaced(f"{func} read a {low[0].dtype} tensor {tuple(low[0].shape)}; from " + " <- ".join(where[::-1][:4]))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir, tmp_path_factory, image_folder) -> dict:
    root = tmp_path_factory.mktemp("device")
    splits = {"train": 6, "test": 3}
    warm = image_folder(root / "warm", {"red": (220, 30, 30), "orange": (230, 140, 20)}, splits, size=(40, 36))
    cold = image_folder(root / "cold", {"blue": (30, 30, 220), "cyan": (20, 200, 220)}, splits, size=(40, 36))
    grey = image_folder(root / "grey", {"grey": (120, 120, 120), "white": (215, 215, 215)}, {"train": 4})
    return {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": True},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"reference": str(grey), "hidden": 8, "iterations": 20, "reference_iterations": 20,
                     "batch_size": 4, "negatives": "reference"},
        "optim": {"iterations": 5, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2, "eval_batch_size": 8,
                  "train_augment": False},
        "baselines": {"zscl_reference": str(grey)},
        "stream": {"name": "colours", "tasks": [{"name": "warm", "path": str(warm)}, {"name": "cold", "path": str(cold)}]},
        "data": {"workers": 2},
        "checkpoint_every": 2,
        "threads": 1,
    }  # fmt: skip


def _engine(data: dict, out: Path, method: str = "moe_adapters", placement: Placement = FLOAT64) -> Engine:
    cfg = RunConfig.from_dict({**data, "method": method})
    stream = build_stream(cfg.stream, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    return Engine(build_learner(cfg, stream), stream, cfg, out, quiet=True, placement=placement)


@pytest.mark.parametrize("method", ["moe_adapters", "lwf", "wise_ft"])
def test_every_tensor_a_run_and_a_prediction_touch_is_on_the_learners_placement(tiny, tmp_path, method):
    from moecl.results import finish_run

    engine = _engine(tiny, tmp_path / "run", method)
    check = UnplacedTensorCheck()
    with check:
        state = engine.run()  # zero-shot row, 2 tasks with mid-task checkpoints, DDAS fits, 2 evaluated rows
    assert check.ops > 1000 and state.matrix.is_complete()
    learner = engine.learner
    touched = [*learner.parameters(), *learner.buffers()]
    assert all(t.dtype == torch.float64 for t in touched if t.is_floating_point())  # later routers, AEs included
    if method != "moe_adapters":
        return
    assert "selector" in learner.metrics(engine.stream)  # the evaluation routed with DDAS
    assert learner.model.num_tasks == 2 and learner.selector.num_tasks == 2
    finish_run(tmp_path / "run", engine.cfg, learner, engine.stream, state, 0.0)

    from moecl.predict import Predictor

    predictor = Predictor.from_run(tmp_path / "run", engine.cfg, device="cpu")
    predictor.learner.place(FLOAT64)
    images = [Image.new("RGB", (40, 36), (220, 30, 30)), Image.new("RGB", (40, 36), (20, 200, 220))]
    transform = predictor.model.image_transform(False)
    pixels = torch.stack([transform(img) for img in images])  # decoded on the host, as a loader hands them over
    with UnplacedTensorCheck():
        out = predictor.predict_pixels(pixels)
        told = predictor.predict_pixels(pixels, task="cold")
    assert out == predictor.predict(images)
    assert len(out) == 2 and [r["task"] for r in told] == ["cold", "cold"]


def test_the_check_catches_batches_that_skip_the_placement(tiny, tmp_path):
    engine = _engine(tiny, tmp_path / "run")
    engine.data.placement = Placement()  # the batch pipeline no longer moves batches to the learner's placement
    with pytest.raises(Unplaced, match="float32"), UnplacedTensorCheck():
        engine.run()


def test_a_run_stopped_in_one_placement_resumes_in_another(tiny, tmp_path):
    """Checkpoints are written from host copies and restored onto the resumed run's placement: a float32 run
    stopped mid-task (optimizer state and all) continues in float64 without a stray tensor."""
    from moecl.engine import Interrupted

    checks = iter(range(100))  # the stop flag is read after the zero-shot checkpoint, then after every step
    first = _engine(tiny, tmp_path / "run", placement=Placement())
    first.stop_requested = lambda: next(checks) == 3  # task 1, step 3 (a checkpoint at step 2 too)
    with pytest.raises(Interrupted, match="stopped at task 1, step 3"):
        first.run()
    resumed = _engine(tiny, tmp_path / "run")
    with UnplacedTensorCheck():
        state = resumed.run(resume=True)
    assert state.matrix.is_complete() and resumed.learner.model.num_tasks == 2


def test_resolve_device_rules(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"device: '{spec}' asked for, but CUDA is not available here"):
            resolve_device(spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under a launcher: the local rank's GPU
    assert resolve_device("auto") == torch.device("cuda", 1) == resolve_device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="must be auto, cpu, cuda or cuda:N"):
        RunConfig.from_dict({"device": "gpu"})


def test_device_cuda_without_cuda_is_one_error_line_and_writes_nothing(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny))
    before = sorted(tmp_path.rglob("*"))
    commands = [
        ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet", "--device", "cuda"],
        ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet", "device=cuda:1"],
        ["quickstart", "--out", str(tmp_path / "qs"), "--quiet", "--device", "cuda"],
    ]
    for argv in commands:
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "CUDA is not available here" in err[0], err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the --out directory
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    for argv in (["eval", "--run", str(tmp_path / "run"), "--device", "cuda"],
                 ["predict", "--run", str(tmp_path / "run"), str(config), "--device", "cuda"]):  # fmt: skip
        files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "CUDA is not available here" in err[0], err
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == files


def test_resume_accepts_another_device_and_worker_count(tiny, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**tiny, "selector": {"enabled": False}, "device": "auto"}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    (out / "metrics.json").unlink()  # as if it had stopped before the end
    argv = ["train", "--config", str(config), "--out", str(out), "--quiet", "--resume", "--device", "cpu"]
    assert main([*argv, "data.workers=0"]) == 0, capsys.readouterr().err
    assert main([*argv[:-3], "--resume", "seed=7"]) != 0  # a setting that changes results still may not
    assert "belongs to a different config (seed: 42 in the run, 7 now)" in capsys.readouterr().err
