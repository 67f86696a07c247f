"""CLIP (HF transformers `CLIPModel`) as a frozen `Backbone` with MoE sites in every encoder block of both towers.

HF's CLIPEncoderLayer computes `x = x + attn(ln1(x)); x = x + mlp(ln2(x))`. An installed adapter is wired by
replacing `layer_norm2` with Identity and `mlp` with `_MLPWithAdapter`, which returns `mlp(ln2(x)) + adapter(x,
x[:, 0])`: the experts read the residual stream after attention and before LN2, exactly as method.md §1 says, and
the block stays stateless (no hooks, no per-forward state).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecl.backbone.base import Backbone, l2_normalize
from moecl.backbone.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from moecl.config import BackboneConfig

MAX_TEXT_LENGTH = 77

# Architectures of known hub checkpoints, so `pretrained=False` (parameter counts, random-init tests) never downloads.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-base-patch16": {
        "vision_config": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            patch_size=16,
            image_size=224,
        ),
        "text_config": dict(
            hidden_size=512,
            num_hidden_layers=12,
            num_attention_heads=8,
            intermediate_size=2048,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        ),
        "projection_dim": 512,
    },
    "openai/clip-vit-base-patch32": {
        "vision_config": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            patch_size=32,
            image_size=224,
        ),
        "text_config": dict(
            hidden_size=512,
            num_hidden_layers=12,
            num_attention_heads=8,
            intermediate_size=2048,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        ),
        "projection_dim": 512,
    },
    "openai/clip-vit-large-patch14": {
        "vision_config": dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            patch_size=14,
            image_size=224,
        ),
        "text_config": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        ),
        "projection_dim": 768,
    },
}


class _MLPWithAdapter(nn.Module):
    """Stands in for a block's `mlp` once `layer_norm2` is an Identity: mlp(ln2(x)) + adapter(x) (router on x[:, 0])."""

    def __init__(self, ln2: nn.Module, mlp: nn.Module, adapter: nn.Module):
        super().__init__()
        self.ln2 = ln2
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln2(x)) + self.adapter(x)  # the router reads x[:, 0]


def resolve_clip_config(name_or_dir: str):
    """CLIPConfig from a local directory's config.json, the known-hub table, or (last resort) the hub cache."""
    from transformers import CLIPConfig

    path = Path(name_or_dir)
    if (path / "config.json").is_file():
        return CLIPConfig.from_pretrained(str(path))
    if name_or_dir in KNOWN_CONFIGS:
        return CLIPConfig(**KNOWN_CONFIGS[name_or_dir])
    try:
        return CLIPConfig.from_pretrained(name_or_dir)
    except Exception as exc:  # noqa: BLE001 - turned into one clear message
        raise ValueError(
            f"backbone.model: unknown CLIP '{name_or_dir}': not a directory with config.json, not one of "
            f"{', '.join(KNOWN_CONFIGS)}, and its config could not be fetched ({exc})"
        ) from exc


class CLIPBackbone(Backbone):
    """Frozen HF CLIPModel. Images of any `image_size` are accepted (position embeddings are interpolated)."""

    max_text_length = MAX_TEXT_LENGTH

    def __init__(self, model: nn.Module, name: str, tokenizer: Any = None, image_size: int | None = None):
        super().__init__()
        self.model = model
        self.name = name
        self._tokenizer = tokenizer  # loaded lazily for random-init models (parameter counting needs none)
        vision, text = model.config.vision_config, model.config.text_config
        self.image_size = int(image_size or vision.image_size)
        self.embed_dim = int(model.config.projection_dim)
        self.label = f"CLIP {name}"
        self._init_sites({"image": model.vision_model.encoder.layers, "text": model.text_model.encoder.layers})
        self._dims = {"image": int(vision.hidden_size), "text": int(text.hidden_size)}
        self.freeze()

    # construction -----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_dir: str, image_size: int | None = None) -> CLIPBackbone:
        """Hub id or local directory holding a CLIPModel and its tokenizer (`save_pretrained` layout)."""
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(name_or_dir)
            tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
        except OSError as exc:
            raise ValueError(
                f"backbone.model: cannot load CLIP '{name_or_dir}' ({exc}); give a hub id reachable from here, a "
                "directory written by save_pretrained, or use backbone.name=lite for the offline backbone"
            ) from exc
        return cls(model, name_or_dir, tokenizer, image_size)

    @classmethod
    def from_config(cls, cfg: BackboneConfig, pretrained: bool = True) -> CLIPBackbone:
        """pretrained=False: random weights from the architecture alone (works under `torch.device("meta")`)."""
        if pretrained:
            return cls.from_pretrained(cfg.model, cfg.image_size)
        from transformers import CLIPModel

        return cls(CLIPModel(resolve_clip_config(cfg.model)), cfg.model, None, cfg.image_size)

    # Backbone interface ---------------------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def image_transform(self, train: bool) -> ImageTransform:
        return ImageTransform(self.image_size, CLIP_MEAN, CLIP_STD, train=train)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.name)
            except OSError as exc:
                raise ValueError(f"backbone.model: no tokenizer available for '{self.name}' ({exc})") from exc
        return self._tokenizer

    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        with torch.no_grad():
            interpolate = pixels.shape[-1] != vision.config.image_size or pixels.shape[-2] != vision.config.image_size
            x = vision.embeddings(pixels, interpolate_pos_encoding=interpolate)
            x = vision.pre_layrnorm(x)
            for layer in self._towers["image"][: self.prefix_boundary()]:
                x = layer(x, None)
        return x

    def image_suffix(self, prefix: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        x = prefix
        for layer in self._towers["image"][self.prefix_boundary() :]:
            x = layer(x, None)
        pooled = vision.post_layernorm(x[:, 0])
        return l2_normalize(self.model.visual_projection(pooled))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        return l2_normalize(self.model.text_projection(out.pooler_output))

    def _tower_modules(self, tower: str) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """image: the encoder blocks from the first MoE site on (all of them when none is installed),
        post_layernorm and visual_projection. The patch/position embeddings and pre_layrnorm form the cached frozen
        prefix and stay frozen. text: the whole text model plus text_projection. logit_scale is never included."""
        if tower == "image":
            vision = self.model.vision_model
            modules = [*self._towers["image"][self.prefix_boundary() :], vision.post_layernorm]
            return [*modules, self.model.visual_projection], []
        return [self.model.text_model, self.model.text_projection], []

    def _site_dim(self, tower: str, index: int) -> int:
        return self._dims[tower]

    def _installer(self, tower: str, index: int):
        def install(adapter: nn.Module) -> None:
            if index in self._installed[tower]:
                raise ValueError(f"an adapter is already installed at {tower}.{index}")
            layer = self._towers[tower][index]
            layer.mlp = _MLPWithAdapter(layer.layer_norm2, layer.mlp, adapter)
            layer.layer_norm2 = nn.Identity()
            self._installed[tower].add(index)

        return install

    def architecture(self) -> dict[str, Any]:
        vision, text = self.model.config.vision_config, self.model.config.text_config
        arch = {
            "backbone": "clip",
            "model": self.name,
            "image_hidden": int(vision.hidden_size),
            "image_layers": int(vision.num_hidden_layers),
            "patch_size": int(vision.patch_size),
            "image_size": int(vision.image_size),
            "text_hidden": int(text.hidden_size),
            "text_layers": int(text.num_hidden_layers),
            "projection_dim": self.embed_dim,
        }
        json.dumps(arch)  # must stay JSON-serialisable (adapter_config.json)
        return arch
