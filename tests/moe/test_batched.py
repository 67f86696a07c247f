"""BatchedExperts (the per-sample-weights dispatch with a hand-written backward) against autograd."""

from __future__ import annotations

import pytest
import torch

from moecl.moe.batched import BatchedExperts
from moecl.moe.layer import MoEAdapter


def _expert_tensors(n: int, d: int, r: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        out += [torch.randn(r, d, generator=g), torch.randn(r, generator=g), torch.randn(d, r, generator=g)]
        out += [torch.randn(d, generator=g)]
    return [t.double().requires_grad_() for t in out]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_with_shared_experts_and_dropout(dropout):
    b, length, d, r, k = 3, 5, 4, 2, 2
    params = _expert_tensors(3, d, r)
    slots = [0, 1, 1, 2, 0, 2]  # expert 1 serves two samples, expert 0 two (in different slots)
    tokens = torch.randn(b, length, d, dtype=torch.double, requires_grad=True)
    weight = torch.rand(b, k, dtype=torch.double, requires_grad=True)

    def fn(tokens, weight, *params):
        with torch.random.fork_rng(devices=[]):  # the same dropout mask at every evaluation
            torch.manual_seed(3)
            return BatchedExperts.apply(tokens, weight, None, dropout, slots, *params)

    assert torch.autograd.gradcheck(fn, (tokens, weight, *params))


def test_matches_the_plain_formula_and_leaves_frozen_experts_without_gradient():
    b, length, d, r, k = 2, 4, 3, 2, 2
    params = _expert_tensors(2, d, r)
    for t in params[4:]:  # expert 1 frozen
        t.requires_grad_(False)
    slots = [0, 1, 1, 0]
    tokens = torch.randn(b, length, d, dtype=torch.double)
    weight = torch.rand(b, k, dtype=torch.double)
    got = BatchedExperts.apply(tokens, weight, None, 0.0, slots, *params)
    want = torch.zeros_like(got)
    for i in range(b):
        for j in range(k):
            dw, db, uw, ub = params[4 * slots[i * k + j] : 4 * slots[i * k + j] + 4]
            want[i] += weight[i, j] * (torch.relu(tokens[i] @ dw.t() + db) @ uw.t() + ub)
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    assert all(t.grad is not None for t in params[:4]) and all(t.grad is None for t in params[4:])


def _adapter(noisy: bool) -> MoEAdapter:
    torch.manual_seed(0)
    adapter = MoEAdapter(8, 6, 2, bottleneck=4, dropout=0.0, noisy_gating=noisy).double()
    adapter.add_router()
    with torch.no_grad():
        for expert in adapter.pool.experts:
            for p in expert.parameters():
                p.normal_()
        adapter.routers[0].w_gate.normal_()
        adapter.routers[0].w_noise.normal_()
    adapter.selection = 0
    return adapter.train()


def _grads(adapter: MoEAdapter, tokens: torch.Tensor, fused: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the same routing noise for both
    adapter.zero_grad(set_to_none=True)
    tokens.grad = None
    out = adapter(tokens) if fused else adapter(tokens, tokens[:, 0])  # explicit route: plain autograd for it
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in adapter.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "tokens": tokens.grad, **grads}


@pytest.mark.parametrize("noisy", [False, True])
def test_router_gradient_reaches_token_zero_as_with_plain_autograd(noisy):
    adapter = _adapter(noisy)
    tokens = torch.randn(7, 9, 8, dtype=torch.double, requires_grad=True)  # 9 >= bottleneck: per-sample weights
    assert adapter._fuse_route_gradient(tokens, 0)
    fused, plain = _grads(adapter, tokens, True), _grads(adapter, tokens, False)
    assert fused.keys() == plain.keys() and "routers.0.w_gate" in fused
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], msg=name)
    assert fused["tokens"][:, 0].abs().sum() > 0


def test_plain_route_when_a_balancing_loss_also_reads_it():
    adapter = _adapter(True)
    adapter.track_aux = True
    tokens = torch.randn(3, 9, 8, dtype=torch.double, requires_grad=True)
    assert not adapter._fuse_route_gradient(tokens, 0)
    with torch.no_grad():
        assert not adapter._fuse_route_gradient(tokens, 0)


def test_bf16_autocast_training_gradients_close_to_fp32():
    adapter = _adapter(False).float()
    tokens = torch.randn(4, 9, 8, requires_grad=True)
    want = _grads(adapter, tokens, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(adapter, tokens, True)
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name].float(), want[name], atol=0.05 * scale, rtol=0.05, msg=name)
