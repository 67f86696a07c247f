"""DDAS autoencoder (method.md §4): Linear(in→100) + ReLU → Linear(100→in) + Sigmoid, trained with MSE.

Training works on precomputed feature tensors (the caller extracts features once per image), so fitting one AE per
task costs a few hundred small matrix products. Batches are sampled from a seeded generator: the same features and
seed give the same AE, independently of the global RNG.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

# Below this many multiply-adds per batch (in_dim * hidden * batch) AE work runs on one thread: for such small
# matrices extra OpenMP threads only spin, and on a busy 2-core machine they made training 10-40x slower
# (measured: 1280->100 AE, batch 64, 200 iterations: 0.9 s on 1 thread, 8-34 s on 2).
SMALL_WORK = 1 << 24


@contextlib.contextmanager
def small_work_threads(work: int) -> Iterator[None]:
    """Run the block on one intra-op thread when `work` is small; restores the previous thread count."""
    threads = torch.get_num_threads()
    if work >= SMALL_WORK or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Autoencoder(nn.Module):
    """One DDAS autoencoder; `forward` reconstructs features in (0, 1)."""

    def __init__(self, in_dim: int, hidden: int = 100):
        super().__init__()
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"Autoencoder needs positive sizes, got in_dim={in_dim}, hidden={hidden}")
        self.in_dim = in_dim
        self.hidden = hidden
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(hidden, in_dim), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def per_sample_error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (B,), differentiable (training with negatives)."""
        return (self(x) - x).pow(2).mean(dim=1)

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (B,): the DDAS score of x under this AE."""
        with small_work_threads(self.in_dim * self.hidden * len(x)):
            return self.per_sample_error(x)


def train_autoencoder(
    ae: Autoencoder,
    features: torch.Tensor,
    iterations: int,
    batch_size: int = 64,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    lr_step_epochs: int = 10,
    seed: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "autoencoder",
    negatives: torch.Tensor | None = None,
    negative_errors: torch.Tensor | None = None,
    negative_weight: float = 0.0,
) -> list[float]:
    """Fit `ae` to reconstruct `features` (N, in_dim) in [0, 1]; returns the loss of every iteration.

    Adam (weight decay `weight_decay`), MSE; the learning rate is multiplied by 0.1 every `lr_step_epochs` epochs,
    where an epoch is one pass over the features (ceil(N / batch_size) iterations, each sample once, in an order
    drawn from `generator`, or from a fresh one seeded with `seed`). The last batch of an epoch may be smaller, as
    with a non-dropping shuffled loader.

    Outlier exposure (optional): with `negatives` (M, in_dim) and `negative_errors` (M,) (their per-sample errors
    under a reference AE), every iteration also draws a batch of negatives (own shuffled epochs, same generator) and
    adds negative_weight * mean(relu(1 - e_ae(r) / e_ref(r))): the AE is penalised wherever it reconstructs a
    negative better than the reference AE does, and left alone once it does not.
    """
    if features.ndim != 2 or features.shape[1] != ae.in_dim:
        raise ValueError(f"autoencoder features must have shape (N, {ae.in_dim}), got {tuple(features.shape)}")
    n = features.shape[0]
    if n == 0:
        raise ValueError("cannot train a DDAS autoencoder on zero feature vectors (the task has no images)")
    if iterations < 0 or batch_size < 1 or lr_step_epochs < 1:
        raise ValueError(
            f"bad autoencoder training settings: iterations={iterations}, batch_size={batch_size}, "
            f"lr_step_epochs={lr_step_epochs}"
        )
    use_neg = negatives is not None and negative_weight > 0
    if use_neg and (
        negative_errors is None
        or negatives.ndim != 2
        or negatives.shape[1] != ae.in_dim
        or negative_errors.shape != (negatives.shape[0],)
        or negatives.shape[0] == 0
    ):
        raise ValueError("autoencoder negatives must have shape (M>0, in_dim) with negative_errors of shape (M,)")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    device = next(ae.parameters()).device
    features = features.detach().to(device=device, dtype=next(ae.parameters()).dtype)
    per_epoch = math.ceil(n / batch_size)
    if use_neg:
        negatives = negatives.detach().to(device=device, dtype=features.dtype)
        negative_errors = negative_errors.detach().to(device=device, dtype=features.dtype).clamp_min(1e-12)
        neg_per_epoch = math.ceil(negatives.shape[0] / batch_size)
        neg_order = torch.empty(0, dtype=torch.long)
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step_epochs * per_epoch, gamma=0.1)
    was_training = ae.training
    ae.train()
    losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    work = ae.in_dim * ae.hidden * min(n, batch_size)
    bar = tqdm(total=iterations, desc=desc, disable=not progress, leave=False)
    with torch.enable_grad(), small_work_threads(work), bar:
        for it in range(iterations):
            pos = it % per_epoch
            if pos == 0:
                order = torch.randperm(n, generator=gen)
            batch = features[order[pos * batch_size : (pos + 1) * batch_size].to(device)]
            loss = nn.functional.mse_loss(ae(batch), batch)
            if use_neg:
                npos = it % neg_per_epoch
                if npos == 0:
                    neg_order = torch.randperm(negatives.shape[0], generator=gen)
                idx = neg_order[npos * batch_size : (npos + 1) * batch_size].to(device)
                neg = negatives[idx]
                neg_err = ae.per_sample_error(neg)
                loss = loss + negative_weight * torch.relu(1.0 - neg_err / negative_errors[idx]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    ae.train(was_training)
    return losses
