import pytest

from moecl.config import MoEConfig
from moecl.moe.inject import inject_moe_adapters, iter_moe_adapters
from moecl.moe.layer import MoEAdapter


def test_one_adapter_per_requested_site(tiny_backbone):
    adapters = inject_moe_adapters(tiny_backbone, MoEConfig(num_experts=3, layers=(-1,)))
    assert list(adapters) == ["image_1", "text_1"]
    assert all(isinstance(a, MoEAdapter) and a.num_experts == 3 for a in adapters.values())
    found = [a for _, a in iter_moe_adapters(tiny_backbone)]
    assert len(found) == 2 and all(any(a is b for b in adapters.values()) for a in found)


def test_bad_configs_fail_clearly(tiny_backbone):
    with pytest.raises(ValueError, match="listed twice"):
        inject_moe_adapters(tiny_backbone, MoEConfig(num_experts=2, towers=("text",), layers=(1, -1)))
    with pytest.raises(ValueError, match="moe.top_k"):
        inject_moe_adapters(tiny_backbone, MoEConfig(num_experts=2, top_k=3))
    with pytest.raises(ValueError, match="moe.towers"):
        inject_moe_adapters(tiny_backbone, MoEConfig(towers=()))
