"""The backbone interface every frozen dual encoder implements (CLIP via HF transformers, the offline lite one).

MoE injection, DDAS, the methods and the engine only talk to this interface, so they do not care which backbone
runs. A backbone is frozen: its own parameters never train; adapters are installed into it at `MoESite`s.
"""

from __future__ import annotations

import abc
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from moecl.backbone.transforms import ImageTransform
from moecl.config import BackboneConfig, Tower

TOWERS: tuple[str, ...] = typing.get_args(Tower)

# An installed adapter is called as adapter(tokens) or adapter(tokens, route) -> delta:
#   tokens: (B, L, d) the block's residual stream where method.md says the experts read it
#   route:  (B, d)    the feature the router reads when it is not token 0 / [CLS] (the pooled input of conv blocks);
#                     left out, the router reads tokens[:, 0] (and MoEAdapter can fuse that gradient, moe/batched.py)
#   delta:  (B, L, d) added to the block's output (zero for samples with no task selected)
Adapter = Callable[..., torch.Tensor]


class AdapterModule(nn.Module):
    """Base of the modules installed into a frozen backbone at MoESites (peft's BaseTunerLayer): the only modules
    of a backbone that follow train(), that tower_parameters leaves out, and that compile_blocks runs eagerly."""


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # Same arithmetic as HF CLIPModel.forward, so task=None embeddings are bit-identical to the plain model's.
    return x / x.pow(2).sum(dim=-1, keepdim=True).pow(0.5)


@dataclass
class MoESite:
    """One place in a tower where an MoE adapter can be installed."""

    tower: str  # "image" or "text"
    index: int  # block index within the tower
    dim: int  # width of the tokens the adapter reads and writes
    install: Callable[[nn.Module], None]  # wires `adapter` into the block; called once per site


class Backbone(nn.Module, abc.ABC):
    """A frozen image/text dual encoder producing L2-normalised embeddings in a shared space."""

    label: str  # human-readable, shown in reports ("CLIP openai/clip-vit-base-patch16", "lite (...), not CLIP")
    embed_dim: int
    # How DDAS squashes selector_features into (0, 1): "unit" for unit-norm embeddings (sqrt(F)-scaled sigmoid),
    # "sigmoid" for raw network activations (moecl.selector.features).
    selector_squash: ClassVar[Literal["unit", "sigmoid"]] = "unit"
    is_clip: ClassVar[bool] = True  # False: a stand-in dual encoder (lite), which reports say is not CLIP

    def _init_sites(self, towers: dict[str, nn.ModuleList], first_site: dict[str, int] | None = None) -> None:
        """The repeated blocks of each tower (where MoE sites are) and the first block of each that may hold one."""
        self._towers = towers
        self._first_site = {tower: 0 for tower in towers} | (first_site or {})
        self._installed: dict[str, set[int]] = {tower: set() for tower in towers}

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: BackboneConfig, pretrained: bool = True) -> Backbone:
        """The backbone of `cfg`; pretrained=False: random weights from the architecture alone (meta-device safe)."""

    @property
    @abc.abstractmethod
    def logit_scale(self) -> float:
        """Multiplier of cosine similarities (CLIP: 100)."""

    @abc.abstractmethod
    def image_transform(self, train: bool) -> ImageTransform:
        """PIL image -> (3, H, W) float tensor; train=True adds the protocol's augmentation. An ImageTransform, so
        the batch pipeline can crop in its workers and normalise on the device."""

    max_text_length: int  # prompts are truncated to this many tokens

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The text tower's HF tokenizer."""

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batch of prompts -> the text tower's inputs (padded to the longest prompt)."""
        out = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    @abc.abstractmethod
    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen layers before the first installed image MoE site (cacheable per image; no grad)."""

    def prefix_boundary(self) -> int:
        """First image block not in the frozen prefix: the first installed site, else the first possible one (so the
        prefix, and its cache, is the same whether or not adapters are installed later)."""
        installed = self._installed["image"]
        return min(installed) if installed else self._first_site["image"]

    def prefix_blocks(self) -> int:
        """How many image blocks `image_prefix` runs. 0: the prefix is little more than the input image (CLIP with
        an adapter in block 0), so caching the decoded image is cheaper than caching the prefix."""
        return self.prefix_boundary()

    @abc.abstractmethod
    def image_suffix(self, prefix: torch.Tensor) -> torch.Tensor:
        """The remaining layers (where adapters act) -> normalised image embeddings (B, embed_dim)."""

    @abc.abstractmethod
    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """-> normalised text embeddings (N, embed_dim)."""

    def moe_sites(self, towers: Sequence[str], layers: Sequence[int] | None) -> list[MoESite]:
        """Sites in the given towers (layers=None: every block that may hold one; negative indices count from the
        end)."""
        sites = []
        for tower in towers:
            if tower not in TOWERS:
                raise ValueError(f"moe.towers: unknown tower '{tower}' (known: {', '.join(TOWERS)})")
            n, first = len(self._towers[tower]), self._first_site[tower]
            for i in range(first, n) if layers is None else layers:
                if not -n <= i < n:
                    raise ValueError(f"moe.layers: layer {i} out of range for the {tower} tower ({n} blocks)")
                index = i % n
                if index < first:
                    raise ValueError(self._no_site(tower, index))
                sites.append(MoESite(tower, index, self._site_dim(tower, index), self._installer(tower, index)))
        return sites

    def _no_site(self, tower: str, index: int) -> str:
        first = self._first_site[tower]
        return f"moe.layers: {tower} block {index} has no MoE site; only blocks {first}.. do"

    @abc.abstractmethod
    def _site_dim(self, tower: str, index: int) -> int:
        """Width of the tokens an adapter at block `index` of `tower` reads and writes."""

    @abc.abstractmethod
    def _installer(self, tower: str, index: int) -> Callable[[nn.Module], None]:
        """Wires an adapter into block `index` of `tower` (and records it in self._installed)."""

    @abc.abstractmethod
    def architecture(self) -> dict[str, Any]:
        """JSON fingerprint of the architecture: adapters saved on one only load onto an equal one."""

    def tower_parameters(self, tower: str) -> list[nn.Parameter]:
        """The backbone's own parameters a fine-tuning baseline may train in `tower` ("image" or "text").

        "image": everything `image_suffix` uses (never the layers in `image_prefix`: that part is cached per image,
        so it stays frozen); "text": everything `encode_text` uses. Installed adapters are never included. The
        parameters are returned as they are (frozen); the caller unfreezes what it trains."""
        if tower not in TOWERS:
            raise ValueError(f"tower_parameters: unknown tower '{tower}' (known: {', '.join(TOWERS)})")
        modules, extra = self._tower_modules(tower)
        adapters = {id(p) for m in self.modules() if isinstance(m, AdapterModule) for p in m.parameters()}
        return [p for m in modules for p in m.parameters() if id(p) not in adapters] + extra

    @abc.abstractmethod
    def _tower_modules(self, tower: str) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """(modules, loose parameters) of `tower` that tower_parameters returns (adapters inside are left out)."""

    @property
    def selector_dim(self) -> int:
        """Width of selector_features (the embedding's, unless a backbone's DDAS reads something else)."""
        return self.embed_dim

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_suffix(self.image_prefix(pixels))

    def selector_features(self, prefix: torch.Tensor) -> torch.Tensor:
        """Features DDAS reads by default, from the frozen prefix: the frozen image embedding. Callers run this
        with no task selected."""
        return self.image_suffix(prefix)

    def freeze(self) -> Backbone:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Backbone:
        # The frozen backbone's own layers always stay in eval mode (no dropout, BatchNorm statistics never move);
        # only installed adapters (AdapterModule) follow `mode`.
        super().train(False)
        if mode:
            for module in self.modules():
                if isinstance(module, AdapterModule):
                    module.train(True)
        return self
