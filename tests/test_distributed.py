"""`accelerate launch` with 2 CPU processes (gloo DDP) trains a tiny stream to the single-process result.

Tolerance (see moecl/accel.py): with routing noise and dropout off, the 2-process run computes the same gradients
up to float summation order, so every accuracy must agree within one test image, the activate-freeze masks must be
identical and the trained adapter weights equal to 1e-3. The batch of 5 splits 3 + 2, exercising the weighting of
unequal slices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moecl.cli import main

N_TEST = 3  # test images per class


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_yaml(tiny_clip_dir, tmp_path, image_folder) -> Path:
    splits = {"train": 6, "test": N_TEST}
    warm = image_folder(tmp_path / "warm", {"red": (220, 30, 30), "orange": (230, 140, 20)}, splits, size=(40, 36))
    cold = image_folder(tmp_path / "cold", {"blue": (30, 30, 220), "cyan": (20, 200, 220)}, splits, size=(40, 36))
    cfg = {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8, "noisy_gating": False, "dropout": 0.0},
        "selector": {"enabled": False},
        "optim": {"iterations": 8, "batch_size": 5, "warmup_steps": 1, "lr": 5e-2, "eval_batch_size": 8},
        "stream": {
            "name": "colours",
            "tasks": [{"name": "warm", "path": str(warm)}, {"name": "cold", "path": str(cold)}],
        },
        "threads": 1,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_cpu_processes_match_one_process(tiny_yaml, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    cmd = [*launch, "-m", "moecl", "train", "--config", str(tiny_yaml), "--out", str(two), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threads = torch.get_num_threads()
    try:  # the single-process run, in this process, while the launcher starts up
        assert main(["train", "--config", str(tiny_yaml), "--out", str(one), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]

    a = json.loads((one / "metrics.json").read_text())
    b = json.loads((two / "metrics.json").read_text())
    one_image = 100.0 / (2 * N_TEST)
    rows_a, rows_b = [a["zero_shot"], *a["accuracy_matrix"]], [b["zero_shot"], *b["accuracy_matrix"]]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert all(abs(x - y) <= one_image + 1e-9 for x, y in zip(ra, rb, strict=True)), (rows_a, rows_b)

    wa = load_file(str(one / "adapters" / "model.safetensors"))
    wb = load_file(str(two / "adapters" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        if key.endswith((".frozen", ".frozen_at", ".usage", ".tasks_ended")):
            assert torch.equal(wa[key], wb[key]), key  # usage summed over processes -> same activate-freeze
        else:
            torch.testing.assert_close(wa[key], wb[key], atol=1e-3, rtol=1e-3, msg=key)
    assert any(wa[k].any() for k in wa if k.endswith(".frozen"))
    assert any(wa[k].abs().sum() > 0 for k in wa if k.endswith(".up.weight"))  # training really moved the experts
    assert a["accuracy_matrix"][-1] == [100.0, 100.0]  # the stream is learnable: the comparison is not at chance
    # only the main process wrote the log: one record per logged step, no duplicates
    steps = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    keys = [(r["task"], r["step"]) for r in steps if r.get("event") == "step"]
    assert keys and len(keys) == len(set(keys))
