"""The three dispatch layouts of MoEAdapter (shared experts, per-sample weights, per-expert rows) compute exactly
sum_e g_e * Expert_e(x) and give gradients only to the experts they use."""

from __future__ import annotations

import pytest
import torch

from moecl.moe.layer import MoEAdapter


def _adapter(dim: int = 8, experts: int = 6, k: int = 2, bottleneck: int = 4) -> MoEAdapter:
    torch.manual_seed(0)
    adapter = MoEAdapter(dim, experts, k, bottleneck=bottleneck, dropout=0.0)
    adapter.add_router()
    with torch.no_grad():
        for expert in adapter.pool.experts:
            expert.up.weight.normal_()
            expert.up.bias.normal_()
            expert.down.bias.normal_()
        adapter.routers[0].w_gate.normal_()
    adapter.selection = 0
    return adapter.eval()


def _reference(adapter: MoEAdapter, tokens: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(tokens)
    for e, expert in enumerate(adapter.pool.experts):
        out = out + gates[:, e, None, None] * expert(tokens)
    return out


@pytest.mark.parametrize("length", [2, 9])  # shorter / longer than the bottleneck (4): rows / per-sample weights
def test_mixed_routing_matches_dense_reference_values_and_gradients(length):
    adapter = _adapter()
    tokens = torch.randn(7, length, 8, requires_grad=True)
    gates, selected = adapter.gates(tokens[:, 0].detach(), 0)
    assert len({tuple(r) for r in selected.int().tolist()}) > 1  # really mixed routing
    got = adapter._dispatch(tokens, gates, selected)
    want = _reference(adapter, tokens, gates)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.square().sum(), tokens)
    (g_want,) = torch.autograd.grad(want.square().sum(), tokens)
    torch.testing.assert_close(g_got, g_want)


def test_shared_experts_path_when_every_sample_picks_the_same_experts():
    adapter = _adapter()
    tokens = torch.randn(5, 3, 8)
    with torch.no_grad():
        adapter.routers[0].w_gate.zero_()
        adapter.routers[0].w_gate[:, 4] = 1.0  # positive routes: experts 4 and 1 for every sample
        adapter.routers[0].w_gate[:, 1] = 0.5
    route = tokens[:, 0].abs() + 0.1
    gates, selected = adapter.gates(route, 0)
    assert (selected == selected[:1]).all()
    torch.testing.assert_close(adapter._dispatch(tokens, gates, selected), _reference(adapter, tokens, gates))


@pytest.mark.parametrize("length", [2, 9])
def test_only_selected_experts_receive_gradients(length):
    adapter = _adapter().train()
    tokens = torch.randn(3, length, 8)
    adapter(tokens, tokens[:, 0]).sum().backward()
    used = {e for e, ex in enumerate(adapter.pool.experts) if ex.down.weight.grad is not None}
    assert 2 <= len(used) < 6
    assert int(adapter.pool.usage.gt(0).sum()) == len(used)


@pytest.mark.parametrize("length", [2, 9])
def test_bf16_autocast_matches_fp32_for_mixed_and_per_sample_selections(length):
    adapter = _adapter()
    tokens = torch.randn(6, length, 8)
    for selection in (0, torch.tensor([0, -1, 0, 0, -1, 0])):
        adapter.selection = selection
        want = adapter(tokens, tokens[:, 0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = adapter(tokens, tokens[:, 0])
        torch.testing.assert_close(got.float(), want, atol=0.05 * want.abs().max().item(), rtol=0.05)


def test_layout_choice(monkeypatch):
    adapter = _adapter()
    tokens = torch.randn(7, 2, 8)
    gates, selected = adapter.gates(tokens[:, 0], 0)
    calls = []
    for name in ("_per_sample_weights", "_per_expert_rows", "_shared_experts"):
        monkeypatch.setattr(adapter, name, lambda *a, _n=name: calls.append(_n) or a[0])
    adapter._dispatch(tokens, gates, selected)  # short sequences: rows grouped per expert
    adapter._dispatch(torch.randn(7, 9, 8), gates, selected)  # long sequences: per-sample weights
    adapter._dispatch(tokens[:1], gates[:1], selected[:1])  # one sample: shared experts
    assert calls == ["_per_expert_rows", "_per_sample_weights", "_shared_experts"]
