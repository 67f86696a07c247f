"""Features DDAS reads: image -> (B, F) vector in (0, 1) that the autoencoders reconstruct.

An extractor reads one field of a batch (`of(batch)`): backbone features are computed from the frozen prefix the
batch already carries, the paper's AlexNet features from its pixels (`PixelFeatures`: a learner using one asks for
pixels in its passes).

"backbone" (default): the frozen backbone's `selector_features(prefix)` (its image embedding, run with no task
selected), squashed per sample as sigmoid(sqrt(F) * x / ||x||). A backbone whose selector features are raw network
activations instead (lite: pooled Lite0) sets `selector_squash = "sigmoid"` and gets a plain sigmoid, like the
paper's AlexNet features. Why the unit-norm squashing for embeddings: the autoencoders end in a
sigmoid, so targets must lie in (0, 1) (the paper applies a sigmoid to AlexNet activations). A plain sigmoid of an
L2-normalised F-dim embedding maps every coordinate (magnitude ~ 1/sqrt(F)) to ~0.5, crushing the differences the
AEs must see. Rescaling the unit vector by sqrt(F) gives coordinates of root-mean-square exactly 1 for any image,
so the sigmoid works in its informative range. The scale is fixed by F alone, never by task data, so adding a task
never changes the features of earlier tasks (their autoencoders and thresholds stay valid). `squash=False` gives
the selector features as they are (the prototype selector normalises them itself).

"alexnet" (the paper): torchvision's ImageNet AlexNet, conv5 output before its last ReLU and max-pool
(256 x 13 x 13 = 43,264 values) on the backbone-preprocessed image resized to 224 px, passed through a sigmoid.
Needs torchvision (`pip install 'moecl[alexnet]'`) and downloads the weights once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moecl.device import full_precision

FEATURES = ("backbone", "alexnet")
ALEXNET_SIZE = 224
ALEXNET_DIM = 256 * 13 * 13


def squash(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """sigmoid(scale * sqrt(F) * x / ||x||) per row of x (B, F): the "backbone" features' map into (0, 1)."""
    x = full_precision(x)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.sigmoid(x * (scale * math.sqrt(x.shape[1])))


class FeatureExtractor(nn.Module):
    """Callable input (B, ...) -> features (B, dim) in (0, 1); never trains, never builds a graph. The input is
    the frozen prefix of the backbone (`of(batch)` reads batch.prefix), or pixels for a PixelFeatures."""

    name: str
    dim: int

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def of(self, batch: Any) -> torch.Tensor:
        """Features of a moecl.batches.Batch."""
        return self(batch.prefix)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # frozen feature networks stay in eval mode


class PixelFeatures(FeatureExtractor):
    """An extractor with its own network on the transformed pixels (passes must carry pixels)."""

    def of(self, batch: Any) -> torch.Tensor:
        if batch.pixels is None:
            raise ValueError(f"{type(self).__name__} reads pixels, but the batch carries only the frozen prefix")
        return self(batch.pixels)


class BackboneFeatures(FeatureExtractor):
    """sigmoid(scale * sqrt(F) * x / ||x||) of the backbone's selector features of the frozen prefix (see the
    module docstring); `squash=False`: the selector features x themselves."""

    name = "backbone"

    def __init__(self, backbone: Any, scale: float = 1.0, squash: bool = True):
        super().__init__()
        if not hasattr(backbone, "selector_features"):
            raise TypeError(f"DDAS 'backbone' features need a backbone with selector_features(), got {type(backbone)}")
        # Held outside the module tree: the backbone is saved with the run's adapters, not as selector state.
        self._backbone = [backbone]
        self.dim = backbone_feature_dim(backbone)
        self.scale = float(scale)
        self.squashed = squash

    @property
    def backbone(self) -> Any:
        return self._backbone[0]

    @torch.no_grad()
    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        x = full_precision(self.backbone.selector_features(prefix))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"backbone selector_features returned shape {tuple(x.shape)}, expected (B, {self.dim}); a backbone "
                "whose selector features differ from its embedding must set `selector_dim`"
            )
        if not self.squashed:
            return x
        if self.backbone.selector_squash == "sigmoid":
            return torch.sigmoid(x * self.scale)  # raw network activations (lite: pooled Lite0), as the paper's
        return squash(x, self.scale)


def backbone_feature_dim(backbone: Any) -> int:
    """Width of a backbone's selector features (Backbone.selector_dim: lite's pooled Lite0, 1280; else the
    embedding width, CLIP ViT-B/16: 512)."""
    return int(backbone.selector_dim)


def feature_dim(name: str, backbone: Any) -> int:
    """Width of the DDAS features `name` on `backbone`, without building the extractor (no weights needed)."""
    if name == "alexnet":
        return ALEXNET_DIM
    if name == "backbone":
        return backbone_feature_dim(backbone)
    raise ValueError(f"selector.features must be one of {', '.join(FEATURES)}, got {name!r}")


# torchvision's AlexNet `features` = [conv1, relu, pool, conv2, relu, pool, conv3, relu, conv4, relu, conv5, relu,
# pool]: the first 11 end at conv5, before its ReLU and max-pool.
ALEXNET_CONV5 = 11


def alexnet_trunk(seed: int | None = None) -> nn.Sequential:
    """AlexNet's conv1..conv5 with torchvision's layer layout (so its state dict loads as is); He-initialised from
    `seed` when given (a scale model of the paper's features when the ImageNet weights cannot be downloaded)."""
    trunk = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
    )  # fmt: skip
    assert len(trunk) == ALEXNET_CONV5
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        for module in trunk:
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                    module.bias.zero_()
    return trunk


class AlexNetFeatures(PixelFeatures):
    """The paper's DDAS features: sigmoid(AlexNet conv5 before the last ReLU/max-pool), 43,264 values."""

    name = "alexnet"
    dim = ALEXNET_DIM

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk.eval()
        for p in self.trunk.parameters():
            p.requires_grad_(False)

    @classmethod
    def pretrained(cls) -> AlexNetFeatures:
        try:
            from torchvision.models import AlexNet_Weights, alexnet
        except ImportError as exc:
            raise ImportError(
                "selector.features 'alexnet' needs torchvision: pip install 'moecl[alexnet]' (it also downloads the "
                "ImageNet AlexNet weights once, so it needs network access the first time); or use "
                "selector.features=backbone"
            ) from exc
        try:
            model = alexnet(weights=AlexNet_Weights.IMAGENET1K_V1, progress=False)
        except Exception as exc:  # urllib/ssl/hash errors all mean: the weights are not available
            raise OSError(
                f"selector.features 'alexnet': could not load the ImageNet AlexNet weights ({exc}); they are "
                "downloaded once into the torch hub cache, so run once with network access or use "
                "selector.features=backbone"
            ) from exc
        trunk = alexnet_trunk()
        trunk.load_state_dict(nn.Sequential(*list(model.features.children())[:ALEXNET_CONV5]).state_dict())
        return cls(trunk)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (ALEXNET_SIZE, ALEXNET_SIZE):
            # The paper feeds the CLIP-preprocessed 224 px image; other backbone sizes are resized to match.
            pixels = nn.functional.interpolate(
                pixels, size=(ALEXNET_SIZE, ALEXNET_SIZE), mode="bilinear", align_corners=False, antialias=True
            )
        param = next(self.trunk.parameters())
        out = self.trunk(pixels.to(device=param.device, dtype=param.dtype))
        return torch.sigmoid(full_precision(out.flatten(1)))


def build_feature_extractor(name: str, backbone: Any, scale: float = 1.0, squash: bool = True) -> FeatureExtractor:
    """The selector's feature extractor `name` ("backbone" or "alexnet") for a run on `backbone`; `squash`: into
    (0, 1) (what DDAS's autoencoders read), else the backbone's features as they are ("backbone" only)."""
    if name == "backbone":
        return BackboneFeatures(backbone, scale=scale, squash=squash)
    if name == "alexnet":
        return AlexNetFeatures.pretrained()
    raise ValueError(f"selector.features must be one of {', '.join(FEATURES)}, got {name!r}")
