import pytest
import torch

from moecl.selector.autoencoder import Autoencoder, train_autoencoder


def _manifold(n: int, dim: int = 96, seed: int = 0) -> torch.Tensor:
    """Points near a 3-d manifold in (0, 1)^dim: what an AE with a small bottleneck can learn."""
    g = torch.Generator().manual_seed(seed)
    center, basis = torch.randn(dim, generator=g), torch.randn(3, dim, generator=g)
    return torch.sigmoid(center + torch.randn(n, 3, generator=g) @ basis)


def test_paper_size_has_the_paper_parameter_count():
    ae = Autoencoder(43_264, 100)
    assert sum(p.numel() for p in ae.parameters()) == 8_696_164
    out = ae(torch.rand(2, 43_264))
    assert out.shape == (2, 43_264) and bool(((out > 0) & (out < 1)).all())


def test_training_reduces_reconstruction_loss_substantially():
    torch.manual_seed(0)
    feats = _manifold(256)
    ae = Autoencoder(96, hidden=8)
    before = float(ae.reconstruction_error(feats).mean())
    losses = train_autoencoder(ae, feats, iterations=150, batch_size=64, lr=0.01, seed=1)
    after = float(ae.reconstruction_error(feats).mean())
    assert len(losses) == 150
    assert after < 0.2 * before
    assert sum(losses[-10:]) / 10 < 0.2 * losses[0]


def test_training_is_seeded_and_ignores_the_global_rng():
    feats = _manifold(100)
    runs = []
    for global_seed in (0, 123):
        torch.manual_seed(0)
        ae = Autoencoder(96, hidden=8)
        torch.manual_seed(global_seed)  # must not matter: batches come from the seeded generator
        runs.append((train_autoencoder(ae, feats, 30, batch_size=16, seed=7), ae.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    torch.manual_seed(0)
    other = train_autoencoder(Autoencoder(96, hidden=8), feats, 30, batch_size=16, seed=8)
    assert other != runs[0][0]


def _weights_after(iterations: int, lr_step_epochs: int) -> torch.Tensor:
    torch.manual_seed(0)
    ae = Autoencoder(96, hidden=8)
    # 32 features, batch 32: one iteration per epoch
    train_autoencoder(ae, _manifold(32), iterations, batch_size=32, lr=0.01, lr_step_epochs=lr_step_epochs, seed=3)
    return torch.cat([p.detach().flatten() for p in ae.parameters()])


def test_learning_rate_drops_tenfold_every_lr_step_epochs():
    # lr x0.1 every epoch: after 6 epochs the lr is 1e-8, so 30 iterations end where 6 did.
    assert (_weights_after(30, 1) - _weights_after(6, 1)).abs().max() < 1e-5
    # without the decay the extra iterations keep moving the weights
    assert (_weights_after(30, 100) - _weights_after(6, 100)).abs().max() > 1e-3


def test_bad_inputs_raise_clear_errors():
    ae = Autoencoder(8, 4)
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        train_autoencoder(ae, torch.rand(4, 9), 1)
    with pytest.raises(ValueError, match="zero feature vectors"):
        train_autoencoder(ae, torch.rand(0, 8), 1)
    with pytest.raises(ValueError, match="positive sizes"):
        Autoencoder(0)


def _few_shot_weights(iterations: int, lr_step_epochs: int, lr_epoch_rows: int | None) -> torch.Tensor:
    torch.manual_seed(0)
    ae = Autoencoder(96, hidden=8)
    # a 5-shot-sized set: 32 features, batch 16 (2 iterations per pass over it)
    feats = _manifold(32)
    settings = {"lr": 0.003, "lr_step_epochs": lr_step_epochs, "lr_epoch_rows": lr_epoch_rows}
    train_autoencoder(ae, feats, iterations, batch_size=16, seed=3, **settings)
    return torch.cat([p.detach().flatten() for p in ae.parameters()])


def test_few_shot_lr_epoch_is_a_pass_over_the_split_the_shots_were_drawn_from():
    # Official: epoch = iteration // len(full train loader), so a k-shot AE drawn from 10,000 images keeps its LR
    # for 60 iterations (decay every 10 epochs = 6,250 iterations), exactly like a run with no decay at all.
    kept = _few_shot_weights(60, 10, lr_epoch_rows=10_000)
    assert torch.equal(kept, _few_shot_weights(60, 10_000, lr_epoch_rows=None))
    # counting passes over the 32 shots instead decays x0.1 every 20 iterations (the former bug)
    assert (kept - _few_shot_weights(60, 10, lr_epoch_rows=None)).abs().max() > 1e-3


def test_lr_epoch_counts_batches_of_the_larger_split():
    from moecl.selector.autoencoder import schedule

    assert schedule(1000, 5, 64).lr_epoch == 16  # its own rows
    assert schedule(1000, 5, 64, lr_epoch_rows=1020).lr_epoch == 16  # Flowers' 1,020 train images: decay at 160
    assert schedule(1000, 5, 64, lr_epoch_rows=100_000).lr_epoch == 1563  # TinyImageNet train: never in 1,000
    assert schedule(1000, 5, 64, lr_epoch_rows=10).lr_epoch == 16  # never fewer than its own rows
