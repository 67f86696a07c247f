"""MoEAdapter: one block's expert pool plus one router per task; installed at a backbone `MoESite`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moecl.backbone.base import AdapterModule
from moecl.device import full_precision
from moecl.moe.batched import BatchedExperts
from moecl.moe.pool import ExpertPool
from moecl.moe.router import Router, load_balancing_loss

# What an adapter computes for: None (no task: delta 0, the original block), one task for the whole batch, or a
# LongTensor (B,) of per-sample task ids where -1 means "no adapter" for that row.
Selection = int | torch.Tensor | None


class MoEAdapter(AdapterModule):
    """forward(tokens (B, L, d), route (B, d)) -> delta (B, L, d) = sum_e g_e(route) * Expert_e(tokens).

    Routing is per sample: a sample's whole sequence goes to its k experts. Dispatch is batched (never a loop over
    samples or experts): see `_dispatch`.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 22,
        top_k: int = 2,
        bottleneck: int = 64,
        dropout: float = 0.1,
        scale: float = 0.1,
        noisy_gating: bool = True,
        eval_noise: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.top_k = top_k
        self.noisy_gating = noisy_gating
        self.eval_noise = eval_noise  # router noise also at evaluation (moe.eval_noise)
        self.pool = ExpertPool(dim, num_experts, bottleneck, dropout, scale)
        self.routers = nn.ModuleList()
        self.selection: Selection = None  # set by MoEAdapterModel.task(); not part of the state
        self.track_aux = False  # keep the last training forward's balancing loss (moe.load_balance_weight > 0)
        self.last_aux: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.pool)

    def add_router(self) -> int:
        router = Router(self.dim, self.num_experts, self.top_k, self.noisy_gating, self.eval_noise)
        router.train(self.training)
        ref = self.pool.experts[0].down.weight  # follow the experts' device (and meta-ness) and float dtype
        self.routers.append(router.to(device=ref.device, dtype=ref.dtype))
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

    # Routing is data-dependent (which experts, how many rows each): torch.compile'd blocks run it eagerly instead
    # of graph-breaking and recompiling for every new routing pattern.
    @torch.compiler.disable
    def forward(self, tokens: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """`route` None: the router reads token 0 ([CLS]) of `tokens`."""
        selection = self.selection
        if selection is None:
            # Exact original block: adding a zero tensor leaves the residual stream bit-identical.
            return tokens.new_zeros(()).expand_as(tokens)
        route_leaf = None
        if route is None:
            route = tokens[:, 0]
            if self._fuse_route_gradient(tokens, selection):
                route = route_leaf = route.detach().requires_grad_()  # BatchedExperts adds its gradient to token 0
        with torch.autocast(route.device.type, enabled=False):  # routing decisions in fp32 under mixed precision
            gates, selected = self.gates(full_precision(route), selection)
        if self.training:
            self.pool.count(selected)
        active = selected.any(1)
        if bool(active.all()):
            return self._dispatch(tokens, gates, selected, route_leaf)
        rows = active.nonzero().squeeze(1)
        delta = torch.zeros_like(tokens)
        if len(rows):
            delta = delta.index_copy(0, rows, self._dispatch(tokens[rows], gates[rows], selected[rows]).to(delta.dtype))
        return delta

    def _fuse_route_gradient(self, tokens: torch.Tensor, selection: Selection) -> bool:
        """Whether the router's gradient to token 0 can go through BatchedExperts (see moe/batched.py): training
        one task on long sequences (the per-sample-weights layout), with no balancing loss that also reads the
        route."""
        return (
            isinstance(selection, int)
            and torch.is_grad_enabled()
            and tokens.requires_grad
            and not (self.track_aux and self.training)
            and tokens.shape[1] >= self.pool.experts[0].down.out_features
        )

    def _dispatch(
        self, tokens: torch.Tensor, gates: torch.Tensor, selected: torch.Tensor, route: torch.Tensor | None = None
    ) -> torch.Tensor:
        """sum over each sample's k experts of gate * Expert(tokens); every row has exactly k selected experts.

        A sample's k experts act as one adapter of width k·bottleneck (their weights side by side, the gate and the
        output scale folded into the hidden units), so no pass over (B, L, d) is spent on gating. Three layouts,
        all with the FLOPs of one dense adapter of that width:
          - every sample uses the same experts: plain matmuls with shared weights (a dense adapter);
          - long sequences (L >= bottleneck, e.g. image tokens): per-sample weights and batched matmuls, moving
            B·k·bottleneck·d weights instead of gathering token rows (BatchedExperts, which also takes the
            router's gradient when `route` is the detached token-0 leaf the router read);
          - short sequences (text prompts): rows sorted by expert, one matmul per used expert, moving B·k·L·d
            token rows instead of per-sample weights (measured faster for 10-400 prompts of 16 tokens).
        Only the selected experts' weights enter the graph: unselected (and frozen) experts get no gradient.
        """
        b, k = gates.shape[0], self.top_k
        expert_ids = selected.nonzero()[:, 1].view(b, k)  # row-major: each sample's k experts, ascending
        weight = (gates.gather(1, expert_ids) * self.pool.experts[0].scale).to(tokens.dtype)  # (B, k)
        if route is not None:
            return self._per_sample_weights(tokens, expert_ids, weight, route)
        if b == 1 or bool((expert_ids == expert_ids[:1]).all()):
            return self._shared_experts(tokens, expert_ids[0].tolist(), weight)
        if tokens.shape[1] >= self.pool.experts[0].down.out_features:
            return self._per_sample_weights(tokens, expert_ids, weight)
        return self._per_expert_rows(tokens, expert_ids, weight)

    def _hidden(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """ReLU → dropout → × gate·scale of each unit's expert (`weight` (N, 1, k) broadcasts over the tokens), plus
        one unit per expert carrying gate·scale, so the up matmul also adds gate·scale·bias (cheaper than a pass over
        the output)."""
        p = self.pool.experts[0].dropout.p
        hidden = F.dropout(torch.relu(hidden), p, self.training and p > 0)
        weight = weight.to(hidden.dtype)
        units = hidden.shape[-1] // weight.shape[-1]
        hidden = hidden * weight.repeat_interleave(units, -1)
        return torch.cat([hidden, weight.expand(*hidden.shape[:-1], weight.shape[-1])], -1)

    def _shared_experts(self, tokens: torch.Tensor, ids: list[int], weight: torch.Tensor) -> torch.Tensor:
        experts = [self.pool.experts[e] for e in ids]
        down_w = torch.cat([e.down.weight for e in experts]).to(tokens.dtype)  # (k·r, d)
        down_b = torch.cat([e.down.bias for e in experts]).to(tokens.dtype)
        up = torch.cat([e.up.weight for e in experts] + [e.up.bias[:, None] for e in experts], 1)  # (d, k·r + k)
        hidden = self._hidden(F.linear(tokens, down_w, down_b), weight[:, None, :])
        return F.linear(hidden, up.to(tokens.dtype))

    def _per_sample_weights(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor, route: torch.Tensor | None = None
    ) -> torch.Tensor:
        ids = expert_ids.flatten().tolist()
        used = sorted(set(ids))
        slots = [used.index(e) for e in ids]
        params = [p for e in used for p in self._expert_tensors(e)]
        p = self.pool.experts[0].dropout.p if self.training else 0.0
        return BatchedExperts.apply(tokens, weight, route, p, slots, *params)

    def _expert_tensors(self, e: int) -> tuple[torch.Tensor, ...]:
        expert = self.pool.experts[e]
        return expert.down.weight, expert.down.bias, expert.up.weight, expert.up.bias

    def _per_expert_rows(self, tokens: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        k = expert_ids.shape[1]
        flat = expert_ids.flatten()
        order = torch.argsort(flat, stable=True)
        rows = order // k  # the sample of each (sample, slot) pair, grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        used = [e for e, n in enumerate(counts) if n]
        sizes = [counts[e] for e in used]
        # split (not slicing): its backward is one concatenation instead of a zero-filled copy per expert
        groups = torch.split(tokens.index_select(0, rows), sizes)
        gates = torch.split(weight.flatten()[order], sizes)
        outs = []
        for e, x, w in zip(used, groups, gates, strict=True):
            expert = self.pool.experts[e]
            hidden = self._hidden(expert.down(x).to(tokens.dtype), w[:, None, None])
            up = torch.cat([expert.up.weight, expert.up.bias[:, None]], 1)
            outs.append(F.linear(hidden, up.to(tokens.dtype)))
        return torch.zeros_like(tokens).index_add_(0, rows, torch.cat(outs).to(tokens.dtype))
