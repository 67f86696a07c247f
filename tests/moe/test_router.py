import pytest
import torch

from moecl.moe.router import Router, cv_squared, load_balancing_loss


def _random_router(dim=8, experts=6, k=2):
    router = Router(dim, experts, k)
    with torch.no_grad():
        router.w_gate.normal_()
        router.w_noise.normal_()
    return router


@pytest.mark.parametrize("training", [False, True])
def test_exactly_top_k_nonzero_gates_summing_to_one(training):
    router = _random_router().train(training)
    routing = router.route(torch.randn(32, 8))
    assert routing.gates.shape == (32, 6)
    assert ((routing.gates > 0).sum(1) == 2).all()
    assert torch.equal(routing.gates > 0, routing.selected)
    torch.testing.assert_close(routing.gates.sum(1), torch.ones(32))


def test_gates_are_softmax_over_the_top_k_clean_logits_at_eval():
    router = _random_router().eval()
    h = torch.randn(5, 8)
    clean = h @ router.w_gate
    top, idx = clean.topk(2, dim=-1)
    expected = torch.zeros_like(clean).scatter(1, idx, torch.softmax(top, dim=-1))
    torch.testing.assert_close(router(h), expected)


def test_noise_follows_training_mode_only():
    router = Router(8, 6, 2)  # zero-initialised: clean logits all equal, only noise can change the choice
    h = torch.randn(64, 8)
    router.eval()
    assert torch.equal(router(h), router(h))
    assert ((router(h) == 0.5).sum(1) == 2).all()  # equal logits: two equal gates
    router.train()
    torch.manual_seed(0)
    a, b = router(h), router(h)
    assert not torch.equal(a, b)
    assert Router(8, 6, 2, noisy=False).train()(h).equal(router.eval()(h))


def test_load_balancing_loss_is_zero_when_balanced_and_differentiable_when_noisy():
    assert cv_squared(torch.tensor([3.0, 3.0, 3.0])) == 0
    assert cv_squared(torch.tensor([5.0])) == 0
    gates = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
    assert load_balancing_loss(gates, torch.tensor([2.0, 2.0, 2.0])) == 0
    skewed = torch.tensor([[0.5, 0.5, 0.0]] * 3)
    assert load_balancing_loss(skewed, torch.tensor([3.0, 3.0, 0.0])) > 0.5
    router = _random_router().train()
    routing = router.route(torch.randn(16, 8), with_load=True)
    load_balancing_loss(routing.gates, routing.load).backward()
    assert router.w_gate.grad.abs().sum() > 0 and router.w_noise.grad.abs().sum() > 0


def test_eval_noise_is_off_by_default_and_drawn_from_the_eval_generator_when_on():
    h = torch.randn(16, 8)
    quiet = _random_router(experts=6, k=2).eval()
    assert torch.equal(quiet(h), quiet(h))  # our default: no noise at evaluation
    noisy = Router(8, 6, 2, eval_noise=True)
    noisy.load_state_dict(quiet.state_dict())
    noisy.eval()
    assert not torch.equal(noisy(h), quiet(h))  # the official CIL code: noise also at test time
    state = torch.get_rng_state()
    noisy.eval_generator = torch.Generator().manual_seed(5)
    first = noisy(h)
    noisy.eval_generator = torch.Generator().manual_seed(5)
    assert torch.equal(noisy(h), first)  # reproducible from its seed
    assert torch.equal(torch.get_rng_state(), state)  # evaluation never moves the global RNG
