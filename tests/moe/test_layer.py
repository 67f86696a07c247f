import pytest
import torch

from moecl.moe.layer import MoEAdapter


def _adapter(tasks=2, experts=5, k=2, dim=8):
    torch.manual_seed(0)
    adapter = MoEAdapter(dim, experts, k, bottleneck=4)
    for _ in range(tasks):
        adapter.add_router()
    with torch.no_grad():
        for expert in adapter.pool.experts:
            expert.up.weight.normal_()
        for router in adapter.routers:
            router.w_gate.normal_()
    return adapter.eval()


def _per_sample_reference(adapter, tokens, route, task):
    out = torch.zeros_like(tokens)
    for b in range(len(tokens)):
        if task[b] < 0:
            continue
        gates = adapter.routers[task[b]](route[b : b + 1])[0]
        for e, g in enumerate(gates):
            if g > 0:
                out[b] += g * adapter.pool.experts[e](tokens[b])
    return out


def test_no_selection_is_an_exact_zero_delta():
    adapter = _adapter()
    tokens = torch.randn(3, 4, 8)
    delta = adapter(tokens, tokens[:, 0])
    assert delta.shape == tokens.shape and not delta.any()
    assert torch.equal(tokens + delta, tokens)


def test_batched_dispatch_matches_a_per_sample_loop_for_int_and_mixed_selection():
    adapter = _adapter()
    tokens = torch.randn(6, 4, 8)
    route = tokens[:, 0]
    adapter.selection = 1
    torch.testing.assert_close(adapter(tokens, route), _per_sample_reference(adapter, tokens, route, [1] * 6))
    mixed = torch.tensor([0, 1, -1, 1, 0, -1])
    adapter.selection = mixed
    delta = adapter(tokens, route)
    torch.testing.assert_close(delta, _per_sample_reference(adapter, tokens, route, mixed.tolist()))
    assert not delta[mixed == -1].any() and delta[mixed >= 0].abs().sum() > 0


def test_usage_counted_in_training_only_and_aux_loss_tracked():
    adapter = _adapter(tasks=1)
    adapter.selection = 0
    tokens = torch.randn(10, 3, 8)
    adapter(tokens, tokens[:, 0])
    assert not adapter.pool.usage.any()
    adapter.train()
    adapter.track_aux = True
    adapter(tokens, tokens[:, 0])
    assert int(adapter.pool.usage.sum()) == 10 * 2
    assert adapter.last_aux is not None and adapter.last_aux.requires_grad


def test_gradients_reach_only_selected_experts_and_the_routers_used():
    adapter = _adapter(tasks=2).train()
    adapter.selection = 0
    tokens = torch.randn(1, 3, 8)
    adapter(tokens, tokens[:, 0]).sum().backward()
    used = [e for e, ex in enumerate(adapter.pool.experts) if ex.up.weight.grad is not None]
    assert len(used) == 2
    assert adapter.routers[0].w_gate.grad is not None and adapter.routers[1].w_gate.grad is None


def test_bad_selection_errors():
    adapter = _adapter(tasks=1)
    tokens = torch.randn(2, 3, 8)
    adapter.selection = 3
    with pytest.raises(ValueError, match="task 3 has no router"):
        adapter(tokens, tokens[:, 0])
    adapter.selection = torch.tensor([0, 0, 0])
    with pytest.raises(ValueError, match="per-sample task ids"):
        adapter(tokens, tokens[:, 0])
