"""`moecl bench dist` on the tests' tiny CLIP: 1 process and 2 launched processes (gloo) run the real engine; the
decode split and the consistency of the reported fields are checked, never a time."""

from __future__ import annotations

import math

import pytest

from moecl import bench_dist
from moecl.cli import EXIT_USAGE, main
from moecl.config import RunConfig

N_TRAIN, N_TEST = 6, 4  # per class; 2 classes per task
ITERATIONS, BATCH, EVAL_BATCH = 3, 4, 2  # a row: 2 datasets x 8 test images = 4 + 4 batches, 2 + 2 per process


@pytest.fixture
def tiny_config(tiny_clip_dir, tmp_path, image_folder) -> RunConfig:
    splits = {"train": N_TRAIN, "test": N_TEST}
    warm = image_folder(tmp_path / "warm", {"red": (220, 30, 30), "orange": (230, 140, 20)}, splits)
    cold = image_folder(tmp_path / "cold", {"blue": (30, 30, 220), "cyan": (20, 200, 220)}, splits)
    return RunConfig.from_dict({
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"reference": None, "hidden": 8, "iterations": 4, "batch_size": 4},
        "optim": {"iterations": ITERATIONS, "batch_size": BATCH, "warmup_steps": 1, "eval_batch_size": EVAL_BATCH},
        "stream": {"name": "colours", "tasks": [{"name": "warm", "path": str(warm)}, {"name": "cold", "path": str(cold)}]},
        "data": {"workers": 0, "cache_mb": 0, "reuse_eval": False},
        "device": "cpu",
        "threads": 1,
    })  # fmt: skip


def test_two_processes_each_decode_half_of_every_phase(tiny_config, tmp_path):
    result = bench_dist.bench_dist(tiny_config, tmp_path, processes=(1, 2), label="tiny")
    one, two = result["runs"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["threads_per_process"] == two["threads_per_process"] == result["threads_per_process"] == 1
    assert result["backend"] == "gloo" and "1 process x 1 = 1 cores, 2 processes x 1 = 2 cores" in result["fairness"]

    row_images = 2 * 2 * N_TEST  # both datasets, every test image once (no cache, no reuse)
    for run in (one, two):
        d = run["decoded_per_process"]
        assert all(len(v) == run["processes"] for v in d.values())
        assert run["images"]["eval"] == row_images and run["images"]["eval_all"] == 3 * row_images  # 3 rows
        assert run["images"]["train"] == 2 * ITERATIONS * BATCH
        for k in range(run["processes"]):  # every decode falls in exactly one phase
            assert d["total"][k] == d["train"][k] + d["eval_all"][k] + d["ddas"][k]
        assert len(run["rows_s"]) == 3 and run["eval_s"] == run["rows_s"][-1]
        assert all(math.isfinite(s) and s > 0 for s in (*run["rows_s"], run["train_s"], run["wall_s"]))
    # two processes read the images one process reads, once, each about half (here exactly: even batches)
    assert two["images"] == one["images"]
    assert two["decoded_per_process"]["eval"] == [row_images // 2] * 2
    assert two["decoded_per_process"]["train"] == [ITERATIONS * BATCH] * 2
    assert two["split_within_tolerance"] == {"train": True, "eval": True}
    # the row's classifiers (built again after training): one process builds those its images' routes use, two
    # processes share out every one the row may use (2 datasets x 2 routes x 2 classes, one chunk each: 2 per
    # process). Here DDAS sends no image to some routes, so that is more than one process's lazy set.
    assert one["prompts_per_process"][0] > 0
    assert two["prompts_per_process"][0] == two["prompts_per_process"][1] >= one["prompts_per_process"][0] / 2
    assert result["targets_met"] == {
        "2 processes: train decodes per process within 10% of total/2": True,
        "2 processes: eval decodes per process within 10% of total/2": True,
    }
    assert one["speedup"] == 1.0 and two["speedup"] == pytest.approx(one["eval_s"] / two["eval_s"])

    text = bench_dist.format_result(result)
    assert text.count("TARGET") == 2 and "NOT met" not in text and "1 torch thread" in text
    assert bench_dist.markdown_table(result).count("\n") == 3  # header, rule, one row per process count


def test_an_unbalanced_split_misses_the_target():
    record = {"world_size": 2, "threads": 1, "phases": {"train0": [1.0, 10], "eval0": [1.0, 10], "eval1": [2.0, 6]}}
    other = {**record, "phases": {"train0": [1.0, 10], "eval0": [1.0, 10], "eval1": [2.5, 4]}}
    launch = bench_dist.Launch.from_records(
        2, [{**other, "rank": 1, "decoded": 24}, {**record, "rank": 0, "decoded": 30}], 9.0
    )
    assert launch.eval_s == 2.5 and launch.decoded["eval"] == (6, 4) and launch.decoded["ddas"] == (4, 0)
    assert launch.split_ok("train") and not launch.split_ok("eval")  # 6 vs 5: 20% over an equal share


def test_process_counts_are_checked():
    assert bench_dist.parse_processes("1,2") == (1, 2)
    for bad in ("0", "1,1", "one", ""):
        with pytest.raises(ValueError, match="--processes"):
            bench_dist.parse_processes(bad)
    assert main(["bench", "dist", "--processes", "0,2"]) == EXIT_USAGE
    assert main(["bench", "moe", "--processes", "1,2"]) == EXIT_USAGE  # the option belongs to dist


def test_the_bench_config_computes_every_row_in_full():
    cfg = bench_dist.DIST_LITE.config(threads=1)
    assert (cfg.device, cfg.threads, cfg.data.workers, cfg.data.cache_mb) == (
        "cpu",
        1,
        0,
        0,
    ) and not cfg.data.reuse_eval
    assert cfg.backbone.name == "lite" and not cfg.backbone.cache_prefix and cfg.selector.reference is None
    assert cfg.stream.datasets == ("caltech101", "cifar10")
