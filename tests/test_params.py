"""moecl.params: `moecl params` (meta device, from the config) and metrics.json (the learner a run built and
trained) count through one function, and they agree for every shipped config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from moecl.config import RunConfig
from moecl.data.folder import ImageDataset
from moecl.data.tasks import Task, stream_task_count
from moecl.methods import build_learner
from moecl.params import count_parameters
from moecl.results import parameter_summary

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))


def _empty_task(i: int) -> Task:
    """A task boundary for begin_task: names and prompts only (parameter shapes do not depend on the images)."""
    names = ("a", "b")
    return Task(f"t{i}", f"t{i}", names, ("a photo of a {}.",), *(ImageDataset(f"t{i}", s, names, []) for s in "xy"))


@pytest.mark.parametrize("config", CONFIGS)
def test_counter_agrees_with_the_built_learner(config, tiny_clip_dir):
    cfg = RunConfig.from_dict(yaml.safe_load((ROOT / config).read_text()))
    if cfg.backbone.name == "clip":  # ViT-B/16's tokenizer (begin_task tokenizes prompts) is not available offline
        cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, model=str(tiny_clip_dir), image_size=32))
    if cfg.selector.features == "alexnet":  # its extractor needs torchvision and downloaded weights: not offline
        cfg = cfg.replace(selector=dataclasses.replace(cfg.selector, features="backbone"))
    if cfg.selector.reference is not None:  # from_config reads the reference images: the bundled ones are here
        # (one split of them: the paper protocol's choice of splits and shots does not change a parameter)
        bundled = dataclasses.replace(cfg.selector, reference="imagenet_sample", reference_splits=None, reference_shots=None)
        cfg = cfg.replace(protocol="moecl", selector=bundled)
    num_tasks = stream_task_count(cfg.stream)
    with torch.device("meta"):  # the real build path (from_config, the feature extractor), weights never allocated
        learner = build_learner(cfg, pretrained=False)
    for i in range(num_tasks):
        learner.begin_task(i, _empty_task(i))  # adds the task's router (only one with moe.single_router) on meta
    if learner.parameter_parts().selector is not None:  # what the fits of the reference and every task add
        learner.selector.allocate(num_tasks, reference=cfg.selector.reference is not None)
    assert parameter_summary(learner) == count_parameters(cfg, num_tasks)


def test_quickstart_selector_is_sized_by_the_selector_features():
    """The lite backbone's DDAS reads pooled Lite0 activations (1280), not its 256-d embedding."""
    cfg = RunConfig.from_dict(yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text()))
    counts = count_parameters(cfg, 4)
    assert counts["selector"] == 5 * (1280 * 100 + 100 + 100 * 1280 + 1280) == 1_286_900


@pytest.mark.parametrize("method", ["zero_shot", "finetune", "lwf", "wise_ft", "zscl"])
def test_counter_agrees_for_the_baselines(method):
    cfg = RunConfig.from_dict({**yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text()), "method": method})
    with torch.device("meta"):
        learner = build_learner(cfg, pretrained=False)
    counts = count_parameters(cfg, stream_task_count(cfg.stream))
    assert parameter_summary(learner) == counts
    assert counts["moe"] == counts["selector"] == 0 and (counts["trainable"] > 0) == (method != "zero_shot")
