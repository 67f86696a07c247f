"""A tiny random CLIP saved like a hub checkpoint: what tests and scale-model benchmarks load offline.

`write_tiny_clip(path)` writes a random `CLIPModel` and a character-level `CLIPTokenizer` with `save_pretrained`,
so `CLIPBackbone.from_pretrained(path)` goes through the same loading code as a real hub id. No network.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    plus a character-level CLIPTokenizer, both `save_pretrained` into `path`; returns `path`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), model_max_length=77)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tower = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            tower, vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
