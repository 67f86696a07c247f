"""Noisy top-k router of one task (method.md §2) and the optional importance/load balancing loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moecl.device import full_precision

NOISE_EPSILON = 0.01


@dataclass
class Routing:
    gates: torch.Tensor  # (B, E): top-k entries non-zero (softmax over those k), zeros elsewhere
    selected: torch.Tensor  # (B, E) bool: the top-k experts of each sample
    load: torch.Tensor | None = None  # (E,) expected samples per expert (differentiable when noisy), if requested


class Router(nn.Module):
    """h (B, d) -> sparse gates (B, E). W_gate and W_noise are d×E, bias-free, zero-initialised.

    Noise is added while `self.training`, and at evaluation only with `eval_noise` (the official CIL code's,
    moe.eval_noise): evaluation noise is drawn from `eval_generator` when one is set (MoEAdapterModel.seed_eval_noise),
    so evaluating never moves the global RNG that training noise and dropout use.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, noisy: bool = True, eval_noise: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.noisy = noisy
        self.eval_noise = eval_noise
        self.eval_generator: torch.Generator | None = None  # not state: seeded again before every evaluation row
        self.w_gate = nn.Parameter(torch.zeros(dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(dim, num_experts))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.route(h).gates

    def route(self, h: torch.Tensor, with_load: bool = False) -> Routing:
        clean = h @ self.w_gate
        noisy = self.noisy and (self.training or self.eval_noise)
        if noisy:
            noise_std = F.softplus(h @ self.w_noise) + NOISE_EPSILON
            logits = clean + self._standard_normal(clean) * noise_std
        else:
            logits = clean
        # k+1 largest: the (k+1)-th is the threshold the load estimate needs.
        top_logits, top_idx = logits.topk(min(self.top_k + 1, self.num_experts), dim=-1)
        k_idx = top_idx[:, : self.top_k]
        gates = torch.zeros_like(logits).scatter(1, k_idx, torch.softmax(top_logits[:, : self.top_k], dim=-1))
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter(1, k_idx, True)
        load = None
        if with_load:
            if noisy and self.top_k < self.num_experts:
                load = _prob_in_top_k(clean, logits, noise_std, top_logits, self.top_k).sum(0)
            else:
                load = selected.sum(0).to(logits.dtype)
        return Routing(gates, selected, load)


    def _standard_normal(self, like: torch.Tensor) -> torch.Tensor:
        if self.training or self.eval_generator is None:
            return torch.randn_like(like)
        gen = self.eval_generator
        return torch.randn(like.shape, generator=gen, device=gen.device, dtype=like.dtype).to(like.device)


def _prob_in_top_k(
    clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_logits: torch.Tensor, k: int
) -> torch.Tensor:
    """P(expert in top-k) under fresh noise, per sample and expert (Shazeer et al. 2017): a smooth load estimate."""
    in_threshold = top_logits[:, k : k + 1]  # the k+1-th value: an expert outside the top-k must beat it
    out_threshold = top_logits[:, k - 1 : k]  # the k-th value: an expert inside the top-k is compared against it
    is_in = noisy > in_threshold
    normal = torch.distributions.Normal(torch.zeros((), device=clean.device), torch.ones((), device=clean.device))
    prob_if_in = normal.cdf((clean - in_threshold) / noise_std)
    prob_if_out = normal.cdf((clean - out_threshold) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation; 0 for a single value."""
    x = full_precision(x)
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def load_balancing_loss(gates: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """cv²(importance) + cv²(load), importance = gate mass per expert. Unweighted: the caller applies the weight
    (the reference uses 0.01 and then discards the loss; moe.load_balance_weight=0 is faithful)."""
    return cv_squared(gates.sum(0)) + cv_squared(load)
