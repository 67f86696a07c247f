"""moecl.plan: a run's cost from its config and the dataset sizes (hand computations on tiny streams)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import yaml

from moecl.cli import main
from moecl.config import MIB, RunConfig, SelectorConfig, quickstart_config
from moecl.data import registry
from moecl.data.tasks import build_stream, reference_dataset, stream_data_root
from moecl.methods import METHODS
from moecl.params import count_parameters
from moecl.plan import METHOD_MODELS, GiB, data_sizes, estimate, plan_run, selector_fit_images
from moecl.selector.ddas import AutoSelector, TensorFeatures
from moecl.selector.prototype import PrototypeSelector

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "mtil" / "order1_full.yaml"


def small_config(**optim) -> RunConfig:
    """The quickstart (bundled data, so real sizes) made small enough that every min() of the model bites."""
    data = quickstart_config().to_dict()
    data["optim"].update({"iterations": 5, "batch_size": 8, "eval_batch_size": 16, **optim})
    data["selector"].update({"iterations": 10, "reference_iterations": 3, "batch_size": 16})
    data["stream"].update({"max_train_per_class": 3, "max_test_per_class": 2})
    return RunConfig.from_dict(data)


def test_counts_of_a_small_stream_equal_a_hand_computation():
    cfg = small_config()
    stream = build_stream(cfg.stream, base_dir=ROOT, seed=cfg.seed)
    plan = plan_run(cfg, ROOT)
    n = [len(t.train) for t in stream.tasks]
    m = [len(t.test) for t in stream.tasks]
    refs = len(reference_dataset("imagenet_sample", stream_data_root(cfg.stream)))
    T = len(n)
    assert [(t.train, t.test) for t in plan.sizes.tasks] == list(zip(n, m, strict=True))
    assert plan.sizes.source.startswith("real split sizes") and plan.sizes.reference == refs

    c = plan.counts
    assert plan.steps == (5,) * T and c.training_passes == T * 5 * 8
    assert c.eval_forwards == (T + 1) * sum(m)  # the zero-shot row and one row per task, every test set
    assert c.eval_forwards_reuse == sum(m) + sum(sum(m[:r]) for r in range(1, T + 1))  # learned datasets only
    held = [round(0.2 * x) for x in n]  # threshold "auto": the calibration images
    assert c.ddas_reference == min(refs, 3 * 16)
    assert c.ddas_tasks == sum(min(x - h, 10 * 16) + h for x, h in zip(n, held, strict=True))
    assert c.ddas_eval == T * sum(m)
    assert c.decodes == c.training_passes + c.eval_forwards + c.ddas_reference + c.ddas_tasks
    # the cache holds every image here (train_augment off): only first reads decode, training is counted in full
    assert c.cacheable == sum(m) + sum(n) + c.ddas_reference and c.cache_hit_share == 1.0
    assert c.decodes_cached == c.training_passes + sum(m) + c.ddas_reference

    memory = {line.name: line.bytes for line in plan.memory}
    assert plan.peak_memory == sum(memory.values())
    prefix = 4 * 192 * 4 * 4  # lite at 128 px: fp32 output of the Lite0 blocks before the first MoE site
    assert memory["image/prefix cache"] == c.cacheable * prefix
    fits = [c.ddas_reference, *(min(x - h, 10 * 16) + h for x, h in zip(n, held, strict=True))]
    assert memory["DDAS fit features"] == 2 * max(fits) * 1280 * 4  # held, and its prepared copy
    assert memory["DDAS reference negatives"] == c.ddas_reference * 1280 * 4  # what the reference AE trained on
    # per test image: its zero-shot embedding, T+1 DDAS errors and its 1280 backbone DDAS features
    assert memory["evaluation reuse store"] == sum(m) * (256 * 4 + (T + 1) * 4 + 1280 * 4)
    assert memory["data loader buffers"] == 2 * 16 * 3 * 128 * 128  # 0 workers here -> one in-process batch x 2
    assert plan.disk == 3 * plan.checkpoint_bytes + plan.outputs


def test_epochs_give_steps_per_task_and_the_cache_budget_caps_hits():
    cfg = small_config(epochs=2)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, cache_mb=0))
    plan = plan_run(cfg, ROOT)
    assert plan.steps == tuple(2 * math.ceil(t.train / 8) for t in plan.sizes.tasks)
    assert plan.counts.cache_hit_share == 0 and plan.counts.decodes_cached == plan.counts.decodes
    assert {line.name: line.bytes for line in plan.memory}["image/prefix cache"] == 0


def test_paper_config_fits_16_gib_with_official_sizes(tmp_path):
    data = yaml.safe_load(PAPER.read_text())
    data["stream"]["root"] = str(tmp_path)  # no data there: official sizes, whatever this machine holds
    for device in ("cpu", "cuda"):
        cfg = RunConfig.from_dict({**data, "device": device})
        sizes = data_sizes(cfg, PAPER.parent)
        plan = estimate(cfg, sizes)
        assert sizes.source.startswith("official split sizes (data not found under")
        official = [registry.DATASETS[t.name].split_sizes for t in sizes.tasks]
        assert [(t.train, t.test) for t in sizes.tasks] == [(s["train"], s["test"]) for s in official]
        assert sizes.reference == 100_000 + 10_000  # tinyimagenet: every split, as reference_dataset reads it
        assert plan.peak_memory <= 16 * GiB, plan.format()
        assert plan.counts.eval_forwards_reuse < plan.counts.eval_forwards
        assert plan.counts.decodes_cached < plan.counts.decodes
        memory = {line.name: line.bytes for line in plan.memory}
        assert memory["image/prefix cache"] == 2048 * MIB
        # the largest fit held in host memory: OxfordPet's 3,680 x 43,264 fp32 and their prepared copy (the reference's
        # 64,000 exceed selector.memory_mb: streamed); a cuda run holds them on the GPU
        assert memory.get("DDAS fit features") == (2 * 3_680 * 43_264 * 4 if device == "cpu" else None)
        assert ("CUDA context" in memory) == (device == "cuda")


def test_cil_rows_evaluate_only_learned_steps(tmp_path):
    cfg = RunConfig.from_dict(yaml.safe_load((ROOT / "configs/cil/cifar100_10.yaml").read_text()))
    cfg = cfg.replace(stream=dataclasses.replace(cfg.stream, root=str(tmp_path)))
    plan = plan_run(cfg, ROOT)
    assert [(t.train, t.test) for t in plan.sizes.tasks] == [(5_000, 1_000)] * 10
    assert plan.counts.eval_forwards == 10_000 + sum(r * 1_000 for r in range(1, 11))
    assert plan.counts.eval_forwards_reuse == plan.counts.eval_forwards and plan.counts.ddas_passes == 0
    assert plan.steps == (math.ceil(5_000 / 128),) * 10  # one epoch per step


def test_every_method_has_a_cost_model():
    assert set(METHOD_MODELS) == set(METHODS)
    assert plan_run(small_config().replace(method="zero_shot"), ROOT).counts.training_passes == 0


def test_plan_json_and_train_dry_run(capsys):
    assert main(["plan", "--config", str(ROOT / "configs/quickstart.yaml"), "optim.iterations=7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory"]["peak_bytes"] == sum(c["bytes"] for c in out["memory"]["components"])
    assert [t["steps"] for t in out["sizes"]["tasks"]] == [7] * 4
    assert main(["train", "--config", str(ROOT / "configs/quickstart.yaml"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    summary, end = json.JSONDecoder().raw_decode(text)
    assert summary["num_tasks"] == 4 and "peak host memory" in text[end:]


def test_the_paper_protocol_reference_is_tinyimagenet_train_and_5_per_class_in_few_shot(tmp_path):
    for name, reference in (("order1_full.yaml", 100_000), ("order1_5shot.yaml", 5 * 200)):
        data = yaml.safe_load((PAPER.parent / name).read_text())
        data["stream"]["root"] = str(tmp_path)  # no data there: official sizes
        cfg = RunConfig.from_dict({**data, "protocol": "paper"})
        assert data_sizes(cfg, PAPER.parent).reference == reference


def prototype_config(**selector) -> RunConfig:
    data = quickstart_config().to_dict()
    data["selector"].update({"kind": "prototype", **selector})
    return RunConfig.from_dict(data)


def test_a_prototype_plan_reads_the_train_splits_without_a_reference_and_keeps_prototypes():
    cfg = prototype_config()
    stream = build_stream(cfg.stream, base_dir=ROOT, seed=cfg.seed)
    n = [len(t.train) for t in stream.tasks]
    m = [len(t.test) for t in stream.tasks]
    classes = sum(len(t.classnames) for t in stream.tasks)
    T = len(n)
    plan = plan_run(cfg, ROOT)
    assert [(t.train, t.test, t.classes) for t in plan.sizes.tasks] == [
        (len(t.train), len(t.test), len(t.classnames)) for t in stream.tasks
    ]
    c = plan.counts
    assert plan.sizes.reference == 0 and plan.sizes.reference_name == "" and c.ddas_reference == 0  # no reference fit
    # each task's train split once: the kept images for the prototypes, the held-out ones for calibration
    fits = tuple(n)
    assert selector_fit_images(cfg, plan.sizes) == (0, fits)
    assert c.ddas_tasks == sum(fits) and c.ddas_eval == T * sum(m)
    assert c.decodes == c.training_passes + c.eval_forwards + sum(fits)
    assert c.cacheable == sum(m) + sum(n)  # train_augment off: the fits read images training already cached

    memory = {line.name: line.bytes for line in plan.memory}
    prototypes = classes * 1280 * 4  # one fp32 prototype per class of every task, of the backbone's 1280 features
    assert memory["selector prototypes"] == prototypes
    assert not {"DDAS fit features", "DDAS reference negatives"} & set(memory)  # negatives: DDAS's, with its reference
    moe = count_parameters(cfg, T)["moe"]
    assert memory["adapters + selector"] == moe * 4  # the prototype selector has no parameters
    # per test image: its zero-shot embedding, T+1 selector errors (the reference column: +inf) and its features
    assert memory["evaluation reuse store"] == sum(m) * (256 * 4 + (T + 1) * 4 + 1280 * 4)
    checkpoint = {line.name: line.bytes for line in plan.checkpoint}
    assert checkpoint == {"trained weights": moe * 4, "selector prototypes": prototypes}
    assert plan.outputs == moe * 4 + prototypes

    text = plan.format()
    assert "reference:" not in text and "DDAS" not in text
    passes = next(line for line in text.splitlines() if "feature passes" in line).split()
    counted = [f"{c.ddas_passes:,}", "tasks", f"{sum(fits):,},", "eval", f"{T * sum(m):,}"]
    assert passes == ["prototype", "feature", "passes", *counted]
    gpu = estimate(cfg.replace(device="cuda"), plan.sizes)  # the prototypes live where the selector is
    assert "selector prototypes" not in {line.name for line in gpu.memory}
    assert {line.name: line.bytes for line in gpu.checkpoint}["selector prototypes"] == prototypes


def test_a_prototype_plan_of_official_sizes_counts_every_class(tmp_path):
    data = yaml.safe_load(PAPER.read_text())
    data["stream"]["root"] = str(tmp_path)  # no data there: official sizes
    data["selector"].update({"kind": "prototype", "features": "backbone", "threshold": "auto"})
    cfg = RunConfig.from_dict(data)
    plan = estimate(cfg, data_sizes(cfg, PAPER.parent))
    info = [registry.DATASETS[t.name] for t in plan.sizes.tasks]
    assert [t.classes for t in plan.sizes.tasks] == [i.num_classes for i in info]
    train = [i.split_sizes["train"] for i in info]
    assert plan.sizes.reference == 0 and plan.counts.ddas_tasks == sum(train)
    memory = {line.name: line.bytes for line in plan.memory}
    assert memory["selector prototypes"] == sum(i.num_classes for i in info) * 512 * 4  # ViT-B/16: 512-d embedding


class CountingFeatures(TensorFeatures):
    """Counts every row a fit reads."""

    reads = 0

    def read(self, groups):
        for rows, features in super().read(groups):
            self.reads += len(rows)
            yield rows, features


def test_the_fit_reads_a_plan_counts_are_those_a_fit_makes():
    prototype = SelectorConfig(kind="prototype")
    ddas = SelectorConfig(iterations=3, batch_size=4, hidden=2, reference=None)
    for selector, cfg, sizes in ((PrototypeSelector, prototype, (1, 2, 37)), (AutoSelector, ddas, (1, 5, 37))):
        for n in sizes:
            source = CountingFeatures(torch.rand(n, 6))
            selector(cfg, 6).fit_task(source, labels=torch.arange(n) % 3)
            assert source.reads == selector.task_reads(cfg, n), (selector.KIND, n)


def test_no_reference_fit_is_counted_without_reference_images():
    cfg = small_config()
    data = cfg.to_dict()
    data["selector"].update({"reference": None, "negatives": None, "train_augment": True})
    plan = plan_run(RunConfig.from_dict(data), ROOT)
    assert plan.sizes.reference == 0 and plan.counts.ddas_reference == 0  # augmented fits read 3 x 16: no reference
    held = sum(round(0.2 * t.train) for t in plan.sizes.tasks)
    assert plan.counts.ddas_tasks == len(plan.sizes.tasks) * 10 * 16 + held


def test_params_and_train_dry_run_of_a_prototype_run(capsys):
    quickstart = str(ROOT / "configs/quickstart.yaml")
    assert main(["params", "--config", quickstart, "selector.kind=prototype", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["selector"] == 0 and counts["trainable"] == counts["moe"]
    assert main(["train", "--config", quickstart, "selector.kind=prototype", "--dry-run"]) == 0
    text = capsys.readouterr().out
    _, end = json.JSONDecoder().raw_decode(text)
    assert "prototype feature passes" in text[end:] and "selector prototypes" in text[end:]
