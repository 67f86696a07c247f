"""DDAS autoencoder (method.md §4): Linear(in→100) + ReLU → Linear(100→in) + Sigmoid, trained with MSE.

A fit is planned first (`schedule`: which rows each iteration reads, from a seeded generator, independent of the
global RNG) and then runs on the planned batches (`fit_autoencoder`), which may come from a feature tensor
(`train_autoencoder`) or be computed as they are needed: the same features and seed give the same AE.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moecl.progress import bar as progress_bar

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


@dataclass(frozen=True)
class Schedule:
    """Which rows every iteration of an autoencoder fit reads, drawn before any feature is computed, so a fit can
    hold just the features of those rows or stream them (a fit never needs more than iterations x batch_size
    distinct images, whatever the size of the dataset)."""

    n: int  # rows of the training features
    batch_size: int
    batches: list[torch.Tensor]  # per iteration: the rows it trains on
    negatives: list[torch.Tensor] | None = None  # per iteration: the rows of the negatives it reads
    lr_epoch_rows: int | None = None  # rows of one learning-rate epoch (None: n); see `lr_epoch`

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    @property
    def lr_epoch(self) -> int:
        """Iterations of one epoch of the learning-rate schedule: one pass over `lr_epoch_rows` (the whole split a
        k-shot set was drawn from, as the official code counts batches of the full training loader; a 5-shot set's
        own passes would decay a few-shot AE's LR to 3e-6 within its 300 iterations), else over the n rows."""
        return math.ceil(max(self.n, self.lr_epoch_rows or 0) / self.batch_size)

    def distinct(self) -> torch.Tensor:
        """Sorted rows read at least once."""
        return torch.cat(self.batches).unique() if self.batches else torch.zeros(0, dtype=torch.long)


def schedule(
    n: int,
    iterations: int,
    batch_size: int,
    seed: int = 0,
    n_negatives: int = 0,
    generator: torch.Generator | None = None,
    lr_epoch_rows: int | None = None,
) -> Schedule:
    """Shuffled epochs over `n` rows (each row once per epoch, in an order drawn from `generator`, or from a fresh
    one seeded with `seed`; the last batch of an epoch may be smaller, as with a non-dropping shuffled loader);
    with `n_negatives`, also shuffled epochs of negatives, drawn from the same generator in iteration order.
    `lr_epoch_rows`: the rows of one learning-rate epoch when the n rows are a sample of a larger split."""
    if n <= 0:
        raise ValueError("cannot train a DDAS autoencoder on zero feature vectors (the task has no images)")
    if iterations < 0 or batch_size < 1:
        raise ValueError(f"bad autoencoder training settings: iterations={iterations}, batch_size={batch_size}")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n / batch_size)
    neg_per_epoch = math.ceil(n_negatives / batch_size) if n_negatives else 0
    batches, negatives = [], []
    order = neg_order = torch.empty(0, dtype=torch.long)
    for it in range(iterations):
        pos = it % per_epoch
        if pos == 0:
            order = torch.randperm(n, generator=gen)
        batches.append(order[pos * batch_size : (pos + 1) * batch_size])
        if n_negatives:
            npos = it % neg_per_epoch
            if npos == 0:
                neg_order = torch.randperm(n_negatives, generator=gen)
            negatives.append(neg_order[npos * batch_size : (npos + 1) * batch_size])
    return Schedule(n, batch_size, batches, negatives if n_negatives else None, lr_epoch_rows)


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
    lr_epoch_rows: int | None = None,
) -> list[float]:
    """Fit `ae` to reconstruct `features` (N, in_dim) in [0, 1]; returns the loss of every iteration.

    The batches follow `schedule(N, iterations, batch_size, seed)`; see `fit_autoencoder` for the optimisation.
    """
    if features.ndim != 2 or features.shape[1] != ae.in_dim:
        raise ValueError(f"autoencoder features must have shape (N, {ae.in_dim}), got {tuple(features.shape)}")
    use_neg = negatives is not None and negative_weight > 0
    plan = schedule(
        features.shape[0],
        iterations,
        batch_size,
        seed,
        negatives.shape[0] if use_neg else 0,
        generator=generator,
        lr_epoch_rows=lr_epoch_rows,
    )
    device = next(ae.parameters()).device
    features = features.detach().to(device=device, dtype=next(ae.parameters()).dtype)
    batches = (features[rows.to(device)] for rows in plan.batches)
    settings = FitSettings(lr, weight_decay, lr_step_epochs, negative_weight if use_neg else 0.0)
    if not use_neg:
        negatives = negative_errors = None
    return fit_autoencoder(ae, batches, plan, settings, progress, desc, negatives, negative_errors)


@dataclass(frozen=True)
class FitSettings:
    """How an autoencoder is optimised (the paper's values by default)."""

    lr: float = 0.01
    weight_decay: float = 1e-4
    lr_step_epochs: int = 10
    negative_weight: float = 0.0  # outlier exposure: weight of the negatives' hinge (0: off)


def fit_autoencoder(
    ae: Autoencoder,
    batches: Iterable[torch.Tensor],
    plan: Schedule,
    settings: FitSettings = FitSettings(),
    progress: bool = False,
    desc: str = "autoencoder",
    negatives: torch.Tensor | None = None,
    negative_errors: torch.Tensor | None = None,
) -> list[float]:
    """Fit `ae` on `batches` (one feature batch per iteration of `plan`, in order); returns every iteration's loss.

    Adam (`settings.weight_decay`), MSE; the learning rate is multiplied by 0.1 every `settings.lr_step_epochs`
    learning-rate epochs of the plan (`Schedule.lr_epoch`). A batch may hold fewer rows than the plan named (unreadable images skipped).

    Outlier exposure (optional): with `negatives` (M, in_dim) and `negative_errors` (M,) (their per-sample errors
    under a reference AE), every iteration also reads its plan's batch of negatives and adds
    settings.negative_weight * mean(relu(1 - e_ae(r) / e_ref(r))): the AE is penalised wherever it reconstructs a negative
    better than the reference AE does, and left alone once it does not.
    """
    lr_step_epochs, negative_weight = settings.lr_step_epochs, settings.negative_weight
    if lr_step_epochs < 1:
        raise ValueError(f"bad autoencoder training settings: lr_step_epochs={lr_step_epochs}")
    use_neg = negatives is not None and negative_weight > 0
    if use_neg and (
        negative_errors is None
        or negatives.ndim != 2
        or negatives.shape[1] != ae.in_dim
        or negative_errors.shape != (negatives.shape[0],)
        or negatives.shape[0] == 0
        or plan.negatives is None
    ):
        raise ValueError("autoencoder negatives must have shape (M>0, in_dim) with negative_errors of shape (M,)")
    param = next(ae.parameters())
    device, dtype = param.device, param.dtype
    if use_neg:
        negatives = negatives.detach().to(device=device, dtype=dtype)
        negative_errors = negative_errors.detach().to(device=device, dtype=dtype).clamp_min(1e-12)
    optimizer = torch.optim.Adam(ae.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step_epochs * plan.lr_epoch, gamma=0.1)
    was_training = ae.training
    ae.train()
    losses: list[float] = []
    iterations = len(plan.batches)
    work = ae.in_dim * ae.hidden * min(plan.n, plan.batch_size)
    bar = progress_bar(iterations, desc, disable=not progress)
    with torch.enable_grad(), small_work_threads(work), bar:
        for it, batch in enumerate(batches):
            if it >= iterations:
                raise ValueError(f"autoencoder fit got more batches than its plan's {iterations} iterations")
            batch = batch.detach().to(device=device, dtype=dtype)
            if not len(batch):  # every image of the batch was unreadable (on_bad_image: skip)
                scheduler.step()
                losses.append(float("nan"))
                bar.update(1)
                continue
            loss = nn.functional.mse_loss(ae(batch), batch)
            if use_neg:
                idx = plan.negatives[it].to(device)
                neg_err = ae.per_sample_error(negatives[idx])
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
