"""Crash-safe exact resume (issue 11): a tiny `moecl train` subprocess is killed at many points (SIGKILL via the
test-only MOECL_TEST_KILL_AT hook, plus one SIGTERM), resumed each time, and must end with exactly the metrics and
log of an uninterrupted run with the same seed. Damaged checkpoints are skipped with a warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

TIMEOUT = 300


def tiny_config(clip_dir: Path, data: Path, image_folder, **extra) -> dict:
    """Two tasks of 4 steps, a mid-task checkpoint every 2 steps, one thread (deterministic CPU), DDAS with a
    reference autoencoder: every kind of learner state (adapters, routers, frozen masks, usage counts, selector)."""
    def task(root: Path, colours: dict[str, tuple[int, int, int]], n_train: int = 6, n_test: int = 3) -> Path:
        return image_folder(root, colours, {"train": n_train, "test": n_test}, noise=40, size=(40, 36))

    warm = task(data / "warm", {"red": (220, 30, 30), "orange": (230, 140, 20)})
    cold = task(data / "cold", {"blue": (30, 30, 220), "cyan": (20, 200, 220)})
    grey = task(data / "grey", {"grey": (120, 120, 120), "white": (215, 215, 215)}, n_train=4, n_test=1)
    cfg = {
        "backbone": {"name": "clip", "model": str(clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {
            "enabled": True,
            "reference": str(grey),
            "hidden": 8,
            "iterations": 30,
            "reference_iterations": 30,
            "batch_size": 4,
        },
        "optim": {"iterations": 4, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2, "eval_batch_size": 8},
        "stream": {
            "name": "colours",
            "tasks": [{"name": "warm", "path": str(warm)}, {"name": "cold", "path": str(cold)}],
        },
        "checkpoint_every": 2,
        "threads": 1,
    }
    cfg.update(extra)
    return cfg


def train(config: Path, out: Path, *flags: str, kill_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MOECL_TEST_KILL_AT", None)
    if kill_at:
        env["MOECL_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "moecl", "train", "--config", str(config), "--out", str(out), "--quiet", *flags]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def comparable(out: Path) -> tuple[dict, list[dict]]:
    """metrics.json without the wall-clock time, and log records without their timestamps."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("time_s")
    metrics.pop("evaluation")  # cost, not results: a resumed run recomputes what the killed one had kept
    log = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in (out / "log.jsonl").open()]
    return metrics, log


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir() and not p.name.startswith("."))


def damage_newest(out: Path, file: str) -> str:
    """Truncate (tensors) or edit (state.json) the newest checkpoint; returns its name."""
    newest = checkpoints(out)[-1]
    path = newest / file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if file.endswith(".safetensors") else data.replace(b'"step"', b'"stap"'))
    return newest.name


# (kill point, what the test does to the run directory before resuming). Points: see moecl.checkpoint.crash_point.
KILL_CHAIN = [
    ("eval0-ds1", None),  # zero-shot evaluation, no checkpoint yet: the resume starts from scratch
    ("writing-task0-step2", None),  # inside the first mid-task checkpoint write: its temp dir is left behind
    ("task0-step3", None),  # mid-task, one step after the mid-task checkpoint
    ("saved-task0", None),  # right after the end-of-task checkpoint is in place
    ("task1-step1", "tensors.safetensors"),  # mid-task before any checkpoint of the task; newest ckpt truncated
    ("task1-step3:TERM", None),  # SIGTERM: checkpoint at step 3, then a clean `error: interrupted` exit
    ("eval2-ds0", None),  # during the final evaluation
    ("saved-task1", "state.json"),  # final checkpoint written, metrics.json not yet; newest ckpt edited
]


@pytest.fixture(scope="module")
def tiny_yaml(tiny_clip_dir, tmp_path_factory, image_folder) -> Path:
    root = tmp_path_factory.mktemp("resume")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_clip_dir, root / "data", image_folder)))
    return path


def kill_resume_chain(config: Path, out: Path) -> None:
    """Run KILL_CHAIN in `out` (each run resuming the previous), then resume to the end; checks each step."""
    damaged_warning = False
    for n, (point, damage) in enumerate(KILL_CHAIN):
        rc, err = finish(train(config, out, *(["--resume"] if n else []), kill_at=point))
        if point.endswith(":TERM"):
            assert rc == 2 and "Traceback" not in err, err
            assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
                "error: interrupted: stopped at task 2, step 3; resume with --resume"
            ], err
            assert checkpoints(out)[-1].name.endswith("-task1-step3-stop")
        else:
            assert rc == -signal.SIGKILL, f"kill point {point} was not reached (rc {rc}): {err}"
        assert not (out / "metrics.json").exists()
        if point.startswith("writing-"):
            assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")], "temp dir left"
        if damage:
            damaged = damage_newest(out, damage)
        if n and KILL_CHAIN[n - 1][1]:
            damaged_warning = damaged_warning or f"warning: skipped a damaged checkpoint: {out}" in err
            assert damaged in err, err  # the resume named the damaged checkpoint it skipped
    rc, err = finish(train(config, out, "--resume"))
    assert rc == 0, err
    assert f"{damaged}/state.json does not match its sha256" in err  # the edited final checkpoint was skipped
    assert damaged_warning


def test_kill_anywhere_then_resume_gives_the_uninterrupted_result(tiny_yaml, tmp_path):
    reference = train(tiny_yaml, tmp_path / "reference")  # runs alongside the chain below
    try:
        kill_resume_chain(tiny_yaml, tmp_path / "run")
        rc, err = finish(reference)
        assert rc == 0, err
    finally:
        if reference.poll() is None:  # the chain failed: do not leave the reference run behind
            reference.kill()
            reference.wait()
    out = tmp_path / "run"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]  # crashed writes cleaned
    metrics, log = comparable(out)
    ref_metrics, ref_log = comparable(tmp_path / "reference")
    assert metrics["accuracy_matrix"] == ref_metrics["accuracy_matrix"]
    assert metrics == ref_metrics
    assert log == ref_log  # replayed steps' records were cut and rewritten exactly once
    assert "selector" in metrics  # DDAS routed the evaluation
    for saved in ("adapters/model.safetensors", "selector/autoencoders.safetensors"):
        weights, ref_weights = load_file(out / saved), load_file(tmp_path / "reference" / saved)
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights), saved  # bit-identical


def _engine(cfg: dict, out: Path, stop=None):
    from moecl.config import RunConfig
    from moecl.data.tasks import build_stream
    from moecl.engine import Engine
    from moecl.methods import build_learner

    run_cfg = RunConfig.from_dict(cfg)
    stream = build_stream(run_cfg.stream, seed=run_cfg.seed)
    torch.manual_seed(run_cfg.seed)
    return Engine(build_learner(run_cfg, stream), stream, run_cfg, out, quiet=True, stop_requested=stop)


def test_fp16_loss_scale_survives_a_stop_mid_task(tiny_clip_dir, tmp_path, image_folder):
    """In-process SIGTERM path (stop flag -> checkpoint -> Interrupted) with fp16 loss scaling: the GradScaler's
    backed-off scale is checkpointed, so the resumed run ends bit-identical to the uninterrupted one."""
    from moecl.engine import Interrupted

    cfg = tiny_config(tiny_clip_dir, tmp_path / "data", image_folder, checkpoint_every=0)
    cfg["selector"] = {"enabled": False}
    cfg["optim"].update(precision="fp16")
    reference = _engine(cfg, tmp_path / "reference")
    ref_state = reference.run()
    checks = iter(range(100))  # the stop flag is read after the zero-shot checkpoint, then after every step
    stopped = _engine(cfg, tmp_path / "run", stop=lambda: next(checks) == 3)  # after task 1, step 3
    with pytest.raises(Interrupted, match="stopped at task 1, step 3"):
        stopped.run()
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("*-task0-step3-stop/state.json")).read_text())
    assert saved["scaler"]["scale"] < 65536.0  # the scale backed off from its initial value: it matters here
    resumed = _engine(cfg, tmp_path / "run")
    state = resumed.run(resume=True)
    assert state.matrix.to_dict() == ref_state.matrix.to_dict()
    ours, ref = resumed.learner.model.adapters.state_dict(), reference.learner.model.adapters.state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
