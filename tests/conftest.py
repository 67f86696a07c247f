"""Shared fixtures: a tiny random CLIP (model + offline tokenizer, moecl.backbone.tiny) saved to disk like a hub
checkpoint, image folders of flat colours, a finished tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moecl.backbone.tiny import write_tiny_clip


def make_image_folder(
    root: Path,
    colours: dict[str, tuple[int, int, int]],
    splits: dict[str, int],
    noise: int = 60,
    size: tuple[int, int] = (36, 34),
    seed: int | None = None,
) -> Path:
    """An ImageFolder `root/<split>/<class>/<k>.png` of flat colour images (each colour plus seeded noise up to
    `noise`), n images per class for each split in `splits`. Seed: `seed`, else the sum of the colours."""
    from PIL import Image

    g = torch.Generator().manual_seed(sum(sum(c) for c in colours.values()) if seed is None else seed)
    for split, n in splits.items():
        for name, rgb in colours.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                jitter = (torch.rand(3, generator=g) * noise).int().tolist()
                col = tuple(max(0, min(255, c + e)) for c, e in zip(rgb, jitter, strict=True))
                Image.new("RGB", size, col).save(d / f"{k}.png")
    return root


@pytest.fixture(scope="session")
def image_folder():
    """`make_image_folder`, for test modules (conftest files are not importable by name from every test dir)."""
    return make_image_folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture
def tiny_backbone(tiny_clip_dir: Path):
    """A fresh CLIPBackbone per test (tests install adapters into it), loaded through the hub-id code path."""
    from moecl.backbone.clip import CLIPBackbone

    return CLIPBackbone.from_pretrained(str(tiny_clip_dir))


TWO_COLOUR_TASKS = {
    "warm": {"red": (220, 30, 30), "orange": (230, 140, 20)},
    "cold": {"blue": (30, 30, 220), "cyan": (20, 200, 220)},
}


def train_colour_run(root: Path, clip_dir: Path, selector_iterations: int):
    """`moecl train` of the tiny CLIP with DDAS on two 2-class colour tasks (8 train / 4 test images per class)
    into root/run; returns (run dir, its RunConfig, {task name: image folder})."""
    import yaml

    from moecl.cli import main
    from moecl.config import RunConfig

    splits = {"train": 8, "test": 4}
    tasks = {n: make_image_folder(root / n, c, splits, noise=40, size=(40, 36)) for n, c in TWO_COLOUR_TASKS.items()}
    data = {
        "backbone": {"name": "clip", "model": str(clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"enabled": True, "iterations": selector_iterations, "reference": None, "hidden": 8,
                     "batch_size": 8},
        "optim": {"iterations": 4, "batch_size": 4, "warmup_steps": 1, "lr": 1e-2, "eval_batch_size": 8},
        "stream": {"name": "colours", "tasks": [{"name": n, "path": str(p)} for n, p in tasks.items()]},
    }  # fmt: skip
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    out = root / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    return out, RunConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())), tasks
