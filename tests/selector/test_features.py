import sys

import pytest
import torch

from moecl.selector.features import ALEXNET_DIM, AlexNetFeatures, alexnet_trunk, build_feature_extractor


class StandInBackbone:
    """The part of the Backbone interface DDAS features use: a fixed random projection, L2-normalised."""

    embed_dim = 16
    selector_squash = "unit"

    def __init__(self, width: int = 16):
        self.selector_dim = self.embed_dim  # Backbone's default: the embedding width
        self.proj = torch.randn(3 * 8 * 8, width, generator=torch.Generator().manual_seed(0))

    def selector_features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.flatten(1) @ self.proj
        return x / x.norm(dim=1, keepdim=True)


def test_backbone_features_are_in_unit_interval_with_the_embedding_dim():
    feats = build_feature_extractor("backbone", StandInBackbone())
    pixels = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = feats(pixels)
    assert feats.dim == 16 and out.shape == (5, 16)
    assert bool(((out > 0) & (out < 1)).all())
    assert not out.requires_grad
    # sqrt(F) scaling: the sigmoid inputs have root-mean-square 1 per image, so values spread out instead of
    # all sitting at 0.5 as a plain sigmoid of a unit vector would leave them
    logits = torch.logit(out.double())
    assert torch.allclose(logits.pow(2).mean(1), torch.ones(5, dtype=torch.float64), atol=1e-4)
    assert out.std() > 0.1


def test_backbone_features_do_not_depend_on_the_rest_of_the_batch_or_the_feature_scale():
    backbone = StandInBackbone()
    feats = build_feature_extractor("backbone", backbone)
    pixels = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    together = feats(pixels)
    assert torch.allclose(together[1:2], feats(pixels[1:2]), atol=1e-6)

    class Unnormalised(StandInBackbone):
        def selector_features(self, pixels):
            return 7.0 * super().selector_features(pixels)

    assert torch.allclose(build_feature_extractor("backbone", Unnormalised())(pixels), together, atol=1e-6)


def test_backbone_with_other_selector_width_sets_selector_dim():
    backbone = StandInBackbone(width=24)
    with pytest.raises(ValueError, match="selector_dim"):
        build_feature_extractor("backbone", backbone)(torch.randn(2, 3, 8, 8))
    backbone.selector_dim = 24
    feats = build_feature_extractor("backbone", backbone)
    assert feats.dim == 24 and feats(torch.randn(2, 3, 8, 8)).shape == (2, 24)


def test_alexnet_without_torchvision_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails even where torchvision exists
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ImportError, match=r"moecl\[alexnet\]"):
        build_feature_extractor("alexnet", StandInBackbone())


def test_alexnet_trunk_has_torchvisions_layer_layout_and_seeded_weights():
    trunk = alexnet_trunk(seed=3)
    # torchvision's AlexNet().features[:11] state dict keys: conv layers at 0, 3, 6, 8, 10
    assert [k for k in trunk.state_dict() if k.endswith("weight")] == [f"{i}.weight" for i in (0, 3, 6, 8, 10)]
    assert all(torch.equal(a, b) for a, b in zip(trunk.parameters(), alexnet_trunk(seed=3).parameters(), strict=True))
    assert not torch.equal(trunk[0].weight, alexnet_trunk(seed=4)[0].weight)
    assert alexnet_trunk(seed=0)(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 13, 13)


def test_alexnet_features_are_conv5_sigmoid_at_224_px_for_any_input_size():
    torch.manual_seed(0)
    feats = AlexNetFeatures(alexnet_trunk())
    assert feats.dim == ALEXNET_DIM == 43_264
    for size in (224, 128):
        out = feats(torch.randn(2, 3, size, size))
        assert out.shape == (2, 43_264)
        assert bool(((out > 0) & (out < 1)).all())
    assert not any(p.requires_grad for p in feats.parameters())


def test_unknown_feature_name_is_rejected():
    with pytest.raises(ValueError, match="selector.features"):
        build_feature_extractor("resnet", StandInBackbone())
