"""The batch pipeline: DataLoader workers change who reads a batch, never what it holds; rows stay together;
unreadable images are dropped from every field at once; the prefix cache skips decoding and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moecl.backbone.transforms import ImageTransform
from moecl.batches import Batch, BatchPipeline, batch_indices, resolve_workers
from moecl.cli import main
from moecl.data.folder import BadImageError, read_image_folder
from moecl.device import Placement

COLOURS = {
    "warm": {"red": (220, 30, 30), "orange": (230, 140, 20)},
    "cold": {"blue": (30, 30, 220), "cyan": (20, 200, 220)},
}
CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def _pipeline(workers: int, cache=None, batch_size: int = 4) -> BatchPipeline:
    transforms = (ImageTransform(16), ImageTransform(16, train=True))
    return BatchPipeline(lambda x: x * 2.0, transforms, Placement(), workers=workers, batch_size=batch_size, cache=cache)


@pytest.fixture
def folder(tmp_path, image_folder) -> Path:
    return image_folder(tmp_path / "data", COLOURS["warm"], {"train": 7, "test": 5}, noise=60, size=(40, 36))


def _same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys and x.dataset == y.dataset and torch.equal(x.labels, y.labels)
        assert torch.equal(x.prefix, y.prefix)


def test_training_batches_are_identical_with_0_and_2_workers_and_from_any_start_step(folder):
    ds = read_image_folder(folder, "train", on_bad_image="skip")
    (folder / "train" / "red" / "3.png").write_bytes(CORRUPT)
    pipelines = {w: _pipeline(w) for w in (0, 2)}
    runs = {w: list(p.training_batches(ds, 1, range(9), 4, seed=5, augment=True)) for w, p in pipelines.items()}
    _same(runs[0], runs[2])
    assert len(runs[0]) == 9 and all(b.dataset == 1 for b in runs[0])  # one batch per step, even a short one
    asked = sum(len(batch_indices(len(ds), 4, 5, 1, step)) for step in range(9))  # 2 epochs of 14 and a batch
    assert pipelines[0].skipped == pipelines[2].skipped >= 2  # the unreadable image, once per epoch
    assert sum(len(b) for b in runs[0]) == asked - pipelines[0].skipped
    resumed = list(_pipeline(2).training_batches(ds, 1, range(4, 9), 4, seed=5, augment=True))
    _same(runs[0][4:], resumed)  # a resumed task reads exactly the batches it would have read
    other = list(_pipeline(0).training_batches(ds, 1, range(9), 4, seed=6, augment=True))
    assert not torch.equal(other[0].prefix, runs[0][0].prefix)  # the seed does reach the augmentation


def test_rows_of_a_batch_stay_together_when_an_image_is_unreadable(folder):
    (folder / "test" / "orange" / "0.png").write_bytes(CORRUPT)
    ds = read_image_folder(folder, "test", on_bad_image="skip")
    pipeline = _pipeline(2)
    batches = list(pipeline.evaluation_batches([(3, ds)]))
    assert [len(b) for b in batches] == [3, 4, 2]  # 10 images, the first (orange/0) unreadable
    assert pipeline.skipped == 1
    transform = ImageTransform(16)
    for b in batches:
        for key, label, prefix in zip(b.keys, b.labels.tolist(), b.prefix, strict=True):
            i = [ds.key(n) for n in range(len(ds))].index(key)
            img, want = ds[i]
            assert label == want and torch.equal(prefix, transform(img) * 2.0)  # this row's own image
    sub = batches[0].rows([2, 0])
    assert sub.keys == [batches[0].keys[2], batches[0].keys[0]] and torch.equal(sub.prefix[1], batches[0].prefix[0])


def test_an_unreadable_image_in_error_mode_is_one_clear_error_from_a_worker(folder):
    bad = folder / "test" / "red" / "2.png"
    bad.write_bytes(CORRUPT)
    ds = read_image_folder(folder, "test")
    with pytest.raises(BadImageError) as info:
        list(_pipeline(2).evaluation_batches([(0, ds)]))
    assert f"cannot read image {bad}" in str(info.value) and "\n" not in str(info.value)


def test_cached_prefixes_are_not_decoded_again_and_change_nothing(folder):
    from moecl.backbone.cache import PrefixCache

    ds = read_image_folder(folder, "test")
    cache = PrefixCache()
    pipeline = _pipeline(2, cache)
    first = list(pipeline.evaluation_batches([(0, ds)]))
    assert (cache.hits, cache.misses) == (0, len(ds))
    plan = pipeline._request(0, ds, list(range(4)), None, pixels=False)
    assert plan.decode == (False,) * 4  # the workers will not even read these images
    again = list(pipeline.evaluation_batches([(0, ds)]))
    assert (cache.hits, cache.misses) == (len(ds), len(ds))
    _same(first, again)
    _same(first, list(_pipeline(0).evaluation_batches([(0, ds)])))  # no cache at all: the same batches
    cache.clear()  # evicted after the request was planned: decoded again in the main process
    cache.put(ds.key(0), first[0].prefix[0].clone())
    partial = list(pipeline.evaluation_batches([(0, ds)]))
    _same(first, partial)
    with_pixels = next(pipeline.evaluation_batches([(0, ds)], pixels=True))
    assert torch.equal(with_pixels.pixels * 2.0, with_pixels.prefix)


def test_a_cache_of_crops_serves_prefix_and_pixel_passes_within_its_byte_budget(folder):
    from moecl.backbone.cache import PrefixCache, PrefixContext

    ds = read_image_folder(folder, "test")
    crop = 3 * 16 * 16  # bytes of one uint8 crop at 16 px
    cache = PrefixCache(max_bytes=3 * crop)  # fewer than the 5 images of the split
    transforms = (ImageTransform(16), ImageTransform(16, train=True))
    pipeline = BatchPipeline(
        lambda x: x * 2.0, transforms, Placement(), batch_size=2, cache=cache,
        context=PrefixContext.crops(transforms[0]), cache_crops=True,
    )  # fmt: skip
    first = list(pipeline.evaluation_batches([(0, ds)], pixels=True))
    assert len(cache) == 3 and cache.nbytes == 3 * crop and cache.refused >= 1  # the rest is not admitted
    assert all(cache.get(ds.key(i), pipeline.context).dtype == torch.uint8 for i in range(3))
    plan = pipeline._request(0, ds, [0, 1, 2, 3], None, pixels=True)
    assert plan.decode == (False, False, False, True)  # cached crops also serve passes that want pixels
    again = list(pipeline.evaluation_batches([(0, ds)], pixels=True))
    _same(first, again)
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(first, again, strict=True))
    _same(first, list(_pipeline(0, batch_size=2).evaluation_batches([(0, ds)])))  # = no cache at all


def test_groups_read_any_rows_in_order(folder):
    ds = read_image_folder(folder, "test")
    groups = [[3, 0], [0, 0, 4], [1]]
    batches = list(_pipeline(2).groups(ds, groups))
    assert [b.keys for b in batches] == [[ds.key(i) for i in g] for g in groups]
    alone = next(_pipeline(0).evaluation_batches([(0, ds.subset([3, 0]))]))
    assert torch.equal(batches[0].prefix, alone.prefix)


def test_auto_workers_leave_cores_to_the_model(monkeypatch):
    cores = {"n": 2}
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores["n"])))
    assert resolve_workers(3, torch.device("cpu")) == 3
    assert resolve_workers("auto", torch.device("cpu")) == 0  # a 2-core CPU run: the model needs both
    cores["n"] = 16
    assert resolve_workers("auto", torch.device("cpu")) == 7
    assert resolve_workers("auto", torch.device("cuda", 0)) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes on this node share the cores
    assert resolve_workers("auto", torch.device("cuda", 0)) == 3


# --------------------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_config(tiny_clip_dir, tmp_path, image_folder) -> dict:
    splits = {"train": 6, "test": 4}
    tasks = [
        {"name": n, "path": str(image_folder(tmp_path / n, c, splits, noise=40, size=(40, 36)))}
        for n, c in COLOURS.items()
    ]
    grey = image_folder(tmp_path / "grey", {"grey": (120, 120, 120), "white": (215, 215, 215)}, {"train": 4})
    return {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": True},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"reference": str(grey), "hidden": 8, "iterations": 30, "reference_iterations": 30,
                     "batch_size": 4},
        "optim": {"iterations": 6, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2, "eval_batch_size": 3},
        "stream": {"name": "colours", "tasks": tasks, "on_bad_image": "skip"},
        "checkpoint_every": 2,
        "threads": 1,
    }  # fmt: skip


def _train(config: dict, out: Path, *overrides: str) -> dict:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--config", str(path), "--out", str(out), "--quiet", *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    return _results(out)


def _results(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("time_s")
    metrics.pop("evaluation")  # cost, not results: a resumed run recomputes what the killed one had kept
    extra = json.loads((out / "checkpoints" / "report_extra.json").read_text())
    routing = (extra.get("selector_confusion"), extra.get("selector_unseen_routing"))
    return {"metrics": metrics, "routing": routing}


def test_a_cache_budget_smaller_than_one_dataset_changes_nothing(tiny_config, tmp_path):
    crop = 3 * 32 * 32  # CLIP's first adapter is in block 0: the cache holds decoded uint8 crops
    full = _train(tiny_config, tmp_path / "full", "data.workers=0")
    small = _train(tiny_config, tmp_path / "small", "data.workers=0", f"data.cache_mb={5 * crop / 2**20}")
    none = _train(tiny_config, tmp_path / "none", "data.workers=0", "backbone.cache_prefix=false")
    assert small == full == none and full["metrics"]["selector"]


def test_a_run_with_2_workers_equals_one_with_0(tiny_config, tmp_path):
    # augmented training batches (crops drawn per image): the same images and crops, whoever decoded them
    zero = _train(tiny_config, tmp_path / "zero", "data.workers=0", "optim.train_augment=true")
    two = _train(tiny_config, tmp_path / "two", "data.workers=2", "optim.train_augment=true")
    assert two == zero and zero["metrics"]["selector"]
    for saved in ("adapters/model.safetensors", "selector/autoencoders.safetensors"):
        a, b = load_file(tmp_path / "two" / saved), load_file(tmp_path / "zero" / saved)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), saved


def test_kill_mid_task_and_mid_evaluation_with_workers_then_resume_equals_no_kill(tiny_config, tmp_path):
    reference = _train(tiny_config, tmp_path / "reference", "data.workers=0")
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump({**tiny_config, "data": {"workers": 2}}))
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "moecl", "train", "--config", str(path), "--out", str(out), "--quiet"]
    for n, point in enumerate(("task0-step3", "eval1-ds1", None)):  # mid-task; mid-evaluation; then to the end
        env["MOECL_TEST_KILL_AT"] = point or ""
        proc = subprocess.run([*cmd, *(["--resume"] if n else [])], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == (-signal.SIGKILL if point else 0), proc.stderr
    assert _results(out) == reference
    weights, ref = load_file(out / "adapters/model.safetensors"), load_file(tmp_path / "reference/adapters/model.safetensors")
    assert all(torch.equal(weights[k], ref[k]) for k in ref)


def test_an_unreadable_test_image_changes_nothing_but_its_own_row(tiny_config, tmp_path):
    """on_bad_image: skip with DDAS on: a corrupt first test image of the first task gives the routing and the
    accuracies of the same stream without that image (the selector reads each batch's own rows)."""
    without = json.loads(json.dumps(tiny_config))
    for task in without["stream"]["tasks"]:
        copy = tmp_path / f"{task['name']}_without"
        shutil.copytree(task["path"], copy)
        task["path"] = str(copy)
    bad = Path(tiny_config["stream"]["tasks"][0]["path"]) / "test" / "orange" / "0.png"  # first in sorted order
    bad.write_bytes(CORRUPT)
    (Path(without["stream"]["tasks"][0]["path"]) / "test" / "orange" / "0.png").unlink()
    with_bad = _train(tiny_config, tmp_path / "with_bad", "data.workers=2")
    clean = _train(without, tmp_path / "clean", "data.workers=2")
    assert with_bad == clean
    assert with_bad["metrics"]["selector"]["task_selection_accuracy"] > 0.5  # routing is really tested
    log = [json.loads(x) for x in (tmp_path / "with_bad" / "log.jsonl").read_text().splitlines()]
    assert {r["key"] for r in log if r["event"] == "skipped_image"} == {str(bad)}


def test_the_prefix_cache_changes_nothing_on_the_lite_backbone(tmp_path, image_folder):
    """The lite backbone's prefix is a channels-last feature map; cached rows are stacked. The pipeline hands out one
    layout either way, so a run with the cache equals one without (the layout changes float rounding)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    splits = {"train": 5, "test": 3}
    tasks = [
        {"name": n, "path": str(image_folder(tmp_path / n, c, splits, noise=40, size=(140, 128)))}
        for n, c in COLOURS.items()
    ]
    config = {
        "backbone": {"name": "lite", "image_size": 128},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"enabled": False},
        "optim": {"iterations": 6, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2, "eval_batch_size": 4,
                  "train_augment": False},
        "stream": {"name": "colours", "tasks": tasks},
        "threads": 1,
    }  # fmt: skip
    cached = _train(config, tmp_path / "cached", "backbone.cache_prefix=true")
    fresh = _train(config, tmp_path / "fresh", "backbone.cache_prefix=false")
    assert cached["metrics"] == fresh["metrics"]
    # a byte budget smaller than one dataset: some prefixes cached, the others computed each time; the same run
    prefix_bytes = 4 * 192 * 4 * 4  # fp32 (192, 4, 4) maps of Lite0 at 128 px before its last 3 blocks
    budget = _train(config, tmp_path / "budget", f"data.cache_mb={4 * prefix_bytes / 2**20}")
    assert budget["metrics"] == fresh["metrics"]
    a, b = load_file(tmp_path / "cached/adapters/model.safetensors"), load_file(tmp_path / "fresh/adapters/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_groups_with_augmentation_seeds_read_the_training_transform_reproducibly(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for k in range(3):  # noise images: any two crops differ (a flat colour crops to itself)
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (40, 36, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "train" / "a" / f"{k}.png")
    ds = read_image_folder(tmp_path, "train")
    groups = [[0, 1, 2], [0, 1, 2]]
    plain = list(_pipeline(0).groups(ds, groups))
    assert torch.equal(plain[0].prefix, plain[1].prefix)  # the eval transform: the same rows, the same numbers
    augmented = list(_pipeline(0).groups(ds, groups, augment_seeds=[11, 12]))
    assert [b.keys for b in augmented] == [b.keys for b in plain]
    assert not torch.equal(augmented[0].prefix, augmented[1].prefix)  # every group its own augmentation
    assert not torch.equal(augmented[0].prefix, plain[0].prefix)
    again = list(_pipeline(2).groups(ds, groups, augment_seeds=[11, 12]))  # any number of workers
    _same(augmented, again)
    with pytest.raises(ValueError, match="2 augmentation seeds for 1 groups"):
        list(_pipeline(0).groups(ds, [[0]], augment_seeds=[1, 2]))
    # evaluation passes through the training transform (optim.eval_augment), seeded per batch
    evaluated = list(_pipeline(0).evaluation_batches([(0, ds)], augment_seed=3))
    assert [b.keys for b in evaluated] == [b.keys for b in _pipeline(0).evaluation_batches([(0, ds)])]
    assert not torch.equal(evaluated[0].prefix, next(_pipeline(0).evaluation_batches([(0, ds)])).prefix)
    _same(evaluated, list(_pipeline(2).evaluation_batches([(0, ds)], augment_seed=3)))
