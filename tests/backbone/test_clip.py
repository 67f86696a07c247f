import json
import math

import pytest
import torch
from transformers import CLIPModel

from moecl.backbone import build_backbone
from moecl.backbone.clip import CLIPBackbone
from moecl.backbone.transforms import ImageTransform
from moecl.config import BackboneConfig, MoEConfig
from moecl.moe.model import MoEAdapterModel

PROMPTS = ["a photo of a cat.", "a dog", "x"]


def _hf_logits(model, pixels, tokens):
    """What HF CLIPModel.forward computes, from our embeddings (same arithmetic order)."""
    return ((tokens @ pixels.t()) * model.logit_scale).t()


def test_plain_backbone_and_zero_shot_moe_match_hf_clip(tiny_clip_dir, tiny_backbone):
    reference = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = tiny_backbone.tokenize(PROMPTS)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, **tokens).logits_per_image
        plain = _hf_logits(tiny_backbone, tiny_backbone.encode_image(pixels), tiny_backbone.encode_text(tokens))
        model = MoEAdapterModel(tiny_backbone, MoEConfig(num_experts=4, top_k=2))
        model.add_task()
        for _, adapter in model.adapters.items():  # non-zero experts: task=None must still ignore them
            for expert in adapter.pool.experts:
                torch.nn.init.normal_(expert.up.weight)
        zero_shot = _hf_logits(model, model.encode_image(pixels), model.encode_text(tokens))
        adapted = _hf_logits(model, model.encode_image(pixels, task=0), model.encode_text(tokens, task=0))
    assert math.isclose(tiny_backbone.logit_scale, float(reference.logit_scale.detach().exp()))
    assert (plain - expected).abs().max() <= 1e-6
    assert (zero_shot - expected).abs().max() <= 1e-6
    assert (adapted - expected).abs().max() > 1e-3


def _expert(x, expert):
    return torch.relu(x @ expert.down.weight.t() + expert.down.bias) @ expert.up.weight.t() * 0.1 + expert.up.bias * 0.1


@pytest.mark.parametrize("tower", ["image", "text"])
def test_installed_block_computes_method_section_1(tiny_clip_dir, tiny_backbone, tower):
    reference = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    model = MoEAdapterModel(tiny_backbone, MoEConfig(num_experts=4, top_k=2, towers=(tower,), layers=(1,)))
    model.add_task()
    adapter = model.adapters[f"{tower}_1"]
    torch.manual_seed(1)
    with torch.no_grad():
        for expert in adapter.pool.experts:
            for p in expert.parameters():
                p.normal_()
        adapter.routers[0].w_gate.normal_()
    model.eval()
    layers = {"image": tiny_backbone.model.vision_model, "text": tiny_backbone.model.text_model}[tower].encoder.layers
    ref_layer = {"image": reference.vision_model, "text": reference.text_model}[tower].encoder.layers[1]
    seen = {}
    layers[1].register_forward_hook(lambda m, args, out: seen.update(x=args[0], mask=args[1], out=out))
    with torch.no_grad():
        if tower == "image":
            model.encode_image(torch.randn(2, 3, 32, 32), task=0)
        else:
            model.encode_text(model.tokenize(PROMPTS[:2]), task=0)
        h = seen["x"]
        x = h + ref_layer.self_attn(ref_layer.layer_norm1(h), attention_mask=seen["mask"])[0]
        clean = x[:, 0] @ adapter.routers[0].w_gate
        top, idx = clean.topk(2, dim=-1)
        gates = torch.zeros_like(clean).scatter(1, idx, torch.softmax(top, dim=-1))
        moe = sum(gates[:, e, None, None] * _expert(x, ex) for e, ex in enumerate(adapter.pool.experts))
        manual = x + ref_layer.mlp(ref_layer.layer_norm2(x)) + moe
    assert moe.abs().max() > 1e-2
    torch.testing.assert_close(seen["out"], manual, rtol=1e-5, atol=1e-5)


def test_prefix_suffix_split_and_other_image_sizes(tiny_backbone):
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = tiny_backbone.encode_image(pixels)
        assert tiny_backbone.image_prefix(pixels).shape == (2, 17, 32)  # no site: embeddings + pre-LN only
        model = MoEAdapterModel(tiny_backbone, MoEConfig(num_experts=2, towers=("image",), layers=(-1,)))
        prefix = model.image_prefix(pixels)
        split = model.image_suffix(prefix)
        bigger = model.encode_image(torch.randn(2, 3, 48, 48))  # position embeddings interpolated
    assert not prefix.requires_grad
    torch.testing.assert_close(split, full, rtol=0, atol=1e-6)
    assert bigger.shape == (2, 16)
    torch.testing.assert_close(bigger.norm(dim=-1), torch.ones(2))


def test_moe_sites_and_bad_requests(tiny_backbone):
    sites = tiny_backbone.moe_sites(("image", "text"), None)
    assert [(s.tower, s.index, s.dim) for s in sites] == [
        ("image", 0, 32),
        ("image", 1, 32),
        ("text", 0, 32),
        ("text", 1, 32),
    ]
    assert [s.index for s in tiny_backbone.moe_sites(("text",), (-1,))] == [1]
    with pytest.raises(ValueError, match="out of range"):
        tiny_backbone.moe_sites(("image",), (2,))
    with pytest.raises(ValueError, match="unknown tower 'audio'"):
        tiny_backbone.moe_sites(("audio",), None)


def test_frozen_transform_tokenizer_and_architecture(tiny_backbone):
    assert all(not p.requires_grad for p in tiny_backbone.parameters())
    tiny_backbone.train()
    assert not tiny_backbone.model.training
    transform = tiny_backbone.image_transform(train=True)
    assert isinstance(transform, ImageTransform) and transform.size == 32 and transform.train
    tokens = tiny_backbone.tokenize(PROMPTS)
    assert set(tokens) == {"input_ids", "attention_mask"} and tokens["input_ids"].shape[0] == 3
    arch = tiny_backbone.architecture()
    assert json.loads(json.dumps(arch)) == arch
    assert (arch["image_hidden"], arch["image_layers"], arch["patch_size"], arch["projection_dim"]) == (32, 2, 8, 16)


def test_random_init_from_local_config_and_known_hub_table(tiny_clip_dir, tiny_backbone):
    random = build_backbone(BackboneConfig(name="clip", model=str(tiny_clip_dir), image_size=32), pretrained=False)
    assert isinstance(random, CLIPBackbone)
    assert random.architecture() == tiny_backbone.architecture()
    assert random.tokenize(["a"])["input_ids"].shape[0] == 1  # tokenizer loaded lazily from the directory
    with torch.device("meta"):
        vit_b16 = CLIPBackbone.from_config(BackboneConfig(), pretrained=False)
    assert sum(p.numel() for p in vit_b16.parameters()) == 149_620_737
    arch = vit_b16.architecture()
    assert (arch["image_hidden"], arch["text_hidden"], arch["patch_size"], arch["image_size"]) == (768, 512, 16, 224)


def test_unknown_backbones_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="backbone.name: 'vgg' is not one of clip, lite"):
        build_backbone(BackboneConfig(name="vgg"))
    with pytest.raises(ValueError, match="backbone.model"):
        CLIPBackbone.from_pretrained(str(tmp_path / "missing"))
