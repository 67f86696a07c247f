"""MoEAdapter: one block's expert pool plus one router per task; installed at a backbone `MoESite`."""

from __future__ import annotations

import torch
from torch import nn

from moecl.moe.pool import ExpertPool
from moecl.moe.router import Router, load_balancing_loss

# What an adapter computes for: None (no task: delta 0, the original block), one task for the whole batch, or a
# LongTensor (B,) of per-sample task ids where -1 means "no adapter" for that row.
Selection = int | torch.Tensor | None


class MoEAdapter(nn.Module):
    """forward(tokens (B, L, d), route (B, d)) -> delta (B, L, d) = sum_e g_e(route) * Expert_e(tokens).

    Routing is per sample: a sample's whole sequence goes to its k experts. Dispatch is batched: one forward per
    expert over the rows routed to it (never a loop over samples), weighted by the gate and scattered back.
    """

    _moecl_adapter = True

    def __init__(
        self,
        dim: int,
        num_experts: int = 22,
        top_k: int = 2,
        bottleneck: int = 64,
        dropout: float = 0.1,
        scale: float = 0.1,
        noisy_gating: bool = True,
    ):
        super().__init__()
        self.dim = dim
        self.top_k = top_k
        self.noisy_gating = noisy_gating
        self.pool = ExpertPool(dim, num_experts, bottleneck, dropout, scale)
        self.routers = nn.ModuleList()
        self.selection: Selection = None  # set by MoEAdapterModel.task(); not part of the state
        self.track_aux = False  # keep the last training forward's balancing loss (moe.load_balance_weight > 0)
        self.last_aux: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.pool)

    def add_router(self) -> int:
        router = Router(self.dim, self.num_experts, self.top_k, self.noisy_gating).train(self.training)
        ref = self.pool.frozen  # follow the pool's device (and meta-ness)
        self.routers.append(router.to(ref.device))
        return len(self.routers) - 1

    def gates(self, route: torch.Tensor, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates (B, E), selected (B, E) bool) for `selection` (int task or per-sample LongTensor)."""
        with_load = self.track_aux and self.training and torch.is_grad_enabled()
        if isinstance(selection, int):
            routing = self._router(selection).route(route, with_load)
            if with_load:
                self.last_aux = load_balancing_loss(routing.gates, routing.load)
            return routing.gates, routing.selected
        if selection.shape != route.shape[:1]:
            raise ValueError(f"per-sample task ids have shape {tuple(selection.shape)}, batch is {route.shape[0]}")
        selection = selection.to(route.device)
        gates = route.new_zeros(route.shape[0], self.num_experts)
        selected = torch.zeros_like(gates, dtype=torch.bool)
        aux = []
        for t in selection.unique().tolist():
            if t < 0:
                continue
            rows = (selection == t).nonzero().squeeze(1)
            routing = self._router(t).route(route[rows], with_load)
            gates = gates.index_copy(0, rows, routing.gates)
            selected[rows] = routing.selected
            if with_load:
                aux.append(load_balancing_loss(routing.gates, routing.load))
        if aux:
            self.last_aux = torch.stack(aux).sum()
        return gates, selected

    def _router(self, task: int) -> Router:
        if not 0 <= task < len(self.routers):
            raise ValueError(f"task {task} has no router (this adapter has {len(self.routers)}; call add_task first)")
        return self.routers[task]

    def forward(self, tokens: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        selection = self.selection
        if selection is None:
            # Exact original block: adding a zero tensor leaves the residual stream bit-identical.
            return tokens.new_zeros(()).expand_as(tokens)
        gates, selected = self.gates(route, selection)
        if self.training:
            self.pool.count(selected)
        delta = torch.zeros_like(tokens)
        for e in selected.any(0).nonzero().squeeze(1).tolist():
            rows = selected[:, e].nonzero().squeeze(1)
            out = self.pool.experts[e](tokens[rows]) * gates[rows, e].to(tokens.dtype)[:, None, None]
            delta = delta.index_add(0, rows, out)
        return delta
