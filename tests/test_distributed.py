"""`accelerate launch` with 2 CPU processes (gloo DDP): sharded training, evaluation and DDAS give the single-process
result, each process reads about half of the images, and a run killed with 2 processes is finished by 1.

Tolerance (see moecl/accel.py): with routing noise and dropout off, the 2-process run computes the same gradients
and the same DDAS features up to float summation order (a share of a batch is another matmul shape than the whole),
so every accuracy must agree within one test image, the routing counts within one image per dataset, the
activate-freeze masks must be identical and the trained adapter weights equal to 1e-3. The batch of 5 splits 3 + 2,
exercising the weighting of unequal shares.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moecl.cli import main
from moecl.launch import accelerate_command, process_env

N_TEST = 3  # test images per class
N_TRAIN = 6


@pytest.fixture
def tiny_yaml(tiny_clip_dir, tmp_path, image_folder) -> Path:
    splits = {"train": N_TRAIN, "test": N_TEST}
    warm = image_folder(tmp_path / "warm", {"red": (220, 30, 30), "orange": (230, 140, 20)}, splits, size=(40, 36))
    cold = image_folder(tmp_path / "cold", {"blue": (30, 30, 220), "cyan": (20, 200, 220)}, splits, size=(40, 36))
    grey = image_folder(tmp_path / "grey", {"grey": (120, 120, 120), "white": (215, 215, 215)}, {"train": 5})
    cfg = {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8, "noisy_gating": False, "dropout": 0.0},
        "selector": {"reference": str(grey), "hidden": 8, "iterations": 12, "reference_iterations": 12,
                     "batch_size": 4},
        "optim": {"iterations": 8, "batch_size": 5, "warmup_steps": 1, "lr": 5e-2, "eval_batch_size": 2},
        "stream": {
            "name": "colours",
            "tasks": [{"name": "warm", "path": str(warm)}, {"name": "cold", "path": str(cold)}],
        },
        "data": {"workers": 0},
        "checkpoint_every": 2,
        "threads": 1,
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, out: Path, processes: int, *extra: str, kill_at: str = "") -> subprocess.Popen:
    train = ["moecl", "train", "--config", str(config), "--out", str(out), "--quiet", *extra]
    env = process_env(threads=1, extra={"MOECL_TEST_KILL_AT": kill_at})
    return subprocess.Popen(
        accelerate_command(processes, train), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _single(config: Path, out: Path, *extra: str) -> None:
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--config", str(config), "--out", str(out), "--quiet", *extra]) == 0
    finally:
        torch.set_num_threads(threads)


def _assert_same_run(one: Path, two: Path) -> dict:
    a = json.loads((one / "metrics.json").read_text())
    b = json.loads((two / "metrics.json").read_text())
    one_image = 100.0 / (2 * N_TEST)
    rows_a, rows_b = [a["zero_shot"], *a["accuracy_matrix"]], [b["zero_shot"], *b["accuracy_matrix"]]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert all(abs(x - y) <= one_image + 1e-9 for x, y in zip(ra, rb, strict=True)), (rows_a, rows_b)
    routing_a = json.loads((one / "checkpoints" / "report_extra.json").read_text())["selector_confusion"]
    routing_b = json.loads((two / "checkpoints" / "report_extra.json").read_text())["selector_confusion"]
    assert routing_a.keys() == routing_b.keys()
    for name in routing_a:
        assert sum(routing_a[name].values()) == sum(routing_b[name].values()) == 2 * N_TEST  # every image, once
        branches = set(routing_a[name]) | set(routing_b[name])
        assert sum(abs(routing_a[name].get(k, 0) - routing_b[name].get(k, 0)) for k in branches) <= 2

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
    # the stream is learnable and DDAS routes: the comparison is not at chance
    assert max(a["accuracy_matrix"][-1]) == 100.0 and a["selector"]["task_selection_accuracy"] > 0.5
    return b


def test_two_cpu_processes_match_one_process_and_each_reads_half(tiny_yaml, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = _launch(tiny_yaml, two, 2)
    _single(tiny_yaml, one)  # in this process, while the launcher starts up
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    metrics = _assert_same_run(one, two)

    # every image the run decodes, counted: training (8 steps x 5 per task), evaluation (3 rows x 2 datasets x 6
    # test images), DDAS (the reference AE's and each task AE's schedule, and their calibration images)
    decoded = metrics["decoded_images_per_process"]
    assert len(decoded) == 2 and "decoded_images_per_process" not in json.loads((one / "metrics.json").read_text())
    # each process read about half (the first one a little more: it takes the larger share of odd batches)
    assert abs(decoded[0] - decoded[1]) <= 0.2 * sum(decoded), decoded
    assert sum(decoded) >= 2 * 8 * 5 + 3 * 2 * 2 * N_TEST

    # only the main process wrote the log: one record per logged step, no duplicates
    steps = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    keys = [(r["task"], r["step"]) for r in steps if r.get("event") == "step"]
    assert keys and len(keys) == len(set(keys))


def test_a_run_killed_with_two_processes_is_finished_by_one(tiny_yaml, tmp_path):
    one, killed = tmp_path / "one", tmp_path / "killed"
    proc = _launch(tiny_yaml, killed, 2, kill_at="task1-step5")  # mid-task, after the checkpoint at step 4
    _single(tiny_yaml, one)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and not (killed / "metrics.json").exists(), out[-3000:]
    assert any(p.name.endswith("task1-step4") for p in (killed / "checkpoints").iterdir())
    _single(tiny_yaml, killed, "--resume")
    _assert_same_run(one, killed)


def test_two_processes_share_out_the_prompts_of_the_same_classifiers(tiny_clip_dir, tmp_path, image_folder):
    splits = {"train": 2, "test": 1}
    warm = image_folder(tmp_path / "warm", {"red": (220, 30, 30), "orange": (230, 140, 20)}, splits)
    cold = image_folder(tmp_path / "cold", {"blue": (30, 30, 220), "cyan": (20, 200, 220)}, splits)
    tasks = [{"name": "warm", "path": str(warm)}, {"name": "cold", "path": str(cold)}]
    cfg = {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8, "noisy_gating": False, "dropout": 0.0},
        "selector": {"reference": None},
        "stream": {"name": "colours", "tasks": tasks},
    }
    job = tmp_path / "job"
    job.mkdir()
    (job / "config.json").write_text(json.dumps(cfg))
    worker = Path(__file__).with_name("classifier_worker.py")
    cmd = accelerate_command(2, [str(worker), str(job)], module=False)
    done = subprocess.run(cmd, env=process_env(threads=1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads((job / f"rank{r}.json").read_text()) for r in range(2)]
    for record in records:
        assert record["world_size"] == 2
        assert record["max_difference"] <= 1e-6  # the classifiers one process builds alone
        assert record["classifiers"] == record["distinct"] == 6  # 2 datasets x 3 routes, every one its own
    # each process encoded half of the prompts (6 equal chunks: 3 each), none twice
    total = records[0]["prompts"]
    assert [r["encoded"] for r in records] == [total // 2, total // 2]
