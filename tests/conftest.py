"""Shared fixtures: a tiny random CLIP (model + offline tokenizer) saved to disk like a hub checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def _bytes_to_unicode() -> list[str]:
    # GPT-2 / CLIP byte-level alphabet: 256 printable stand-ins for the 256 byte values.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random CLIPModel (hidden `hidden`, `layers` layers per tower, 4 heads, 32 px, patch 8, projection 16)
    plus a character-level CLIPTokenizer, both `save_pretrained` into `path`. No network."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), model_max_length=77)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
