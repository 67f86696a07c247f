"""BatchedExperts: every sample's own k experts run as one adapter, in batched matmuls with a hand-written backward.

Autograd through the same ops spends extra passes over memory, which on a CPU cost as much as the matmuls: stacking
the up projections transposed, copying the broadcast up-bias into the output, and, because the router reads token 0
of the very tensor the experts read, a zero-filled (B, L, d) gradient for that one token plus its addition to the
experts' gradient. Here the weights are stacked in their own layout (the up matmul reads them through strides), the
bias rides in the up matmul (one extra hidden unit per expert carries gate·scale), and the router's gradient is added
to token 0 of the input gradient this backward creates anyway (`route`). Measured: docs/performance.md.
"""

from __future__ import annotations

import torch


class BatchedExperts(torch.autograd.Function):
    """delta (B, L, d) = sum_j weight[:, j] * Expert_{slot j of the sample}(tokens), per sample:

    tokens  (B, L, d)
    weight  (B, k)   gate · output scale of each sample's k experts
    route   None, or the detached leaf (B, d) the router read token 0 through: its gradient (through `weight`) is
            added to token 0 of the tokens' gradient, as if the router had read tokens[:, 0] itself
    dropout the experts' dropout probability on their hidden units (0: none)
    slots   B·k ints, row-major: which of the experts in `params` each (sample, slot) uses
    params  down.weight, down.bias, up.weight, up.bias of each expert used (each expert once, so a frozen expert is
            simply one whose tensors need no gradient)
    """

    @staticmethod
    def forward(ctx, tokens, weight, route, dropout: float, slots: list[int], *params):
        device = tokens.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tokens.dtype
        down_w, down_b, up_w, up_b = (params[i::4] for i in range(4))
        b, length, d = tokens.shape
        k = weight.shape[1]
        r = down_w[0].shape[0]
        width = k * r
        with torch.autocast(device, enabled=False):
            x, gate = tokens.to(dtype), weight.to(dtype)
            wd = torch.cat([down_w[u] for u in slots]).to(dtype).view(b, width, d)
            bd = torch.cat([down_b[u] for u in slots]).to(dtype).view(b, 1, width)
            columns = []  # per sample: its experts' up weights (d, r) side by side, then one bias column each
            for i in range(0, len(slots), k):
                mine = slots[i : i + k]
                columns += [up_w[u] for u in mine] + [up_b[u][:, None] for u in mine]
            up = torch.cat(columns, 1).to(dtype).view(d, b, width + k).permute(1, 2, 0)  # (B, k·r + k, d), strided
            act = torch.baddbmm(bd, x, wd.transpose(1, 2)).relu_()  # (B, L, k·r)
            if dropout > 0:  # a uniform draw and a compare: half the time of bernoulli_ here
                act.mul_(torch.rand_like(act) >= dropout)  # the 1/(1-p) rescale rides in unit_gate
            unit_gate = gate.repeat_interleave(r, dim=1)[:, None, :] / (1 - dropout)  # (B, 1, k·r)
            hidden = torch.empty(b, length, width + k, dtype=dtype, device=tokens.device)
            torch.mul(act, unit_gate, out=hidden[..., :width])
            hidden[..., width:] = gate[:, None, :]  # the bias units
            out = torch.bmm(hidden, up)
        ctx.save_for_backward(x, wd, up, act, hidden, unit_gate, weight, route)
        ctx.dropout, ctx.slots, ctx.k, ctx.r = dropout, slots, k, r
        ctx.dtypes = (tokens.dtype, [p.dtype for p in params])
        return out.to(tokens.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, wd, up, act, hidden, unit_gate, weight, route = ctx.saved_tensors
        need_tokens, need_weight = ctx.needs_input_grad[:2]
        need_params = ctx.needs_input_grad[5:]
        k, r, slots = ctx.k, ctx.r, ctx.slots
        width = k * r
        t_dtype, p_dtypes = ctx.dtypes
        with torch.autocast(x.device.type, enabled=False):
            g = grad.to(x.dtype).contiguous()  # bmm would copy a broadcast grad (e.g. of a .sum()) once per sample
            g_hidden = torch.bmm(g, up.transpose(1, 2))  # (B, L, k·r + k)
            g_act = g_hidden[..., :width]
            g_weight = None
            if need_weight or route is not None:
                per_unit = (g_act * act).sum(1).view(-1, k, r).sum(-1) / (1 - ctx.dropout)
                g_weight = (per_unit + g_hidden[..., width:].sum(1)).to(weight.dtype)
            # the hidden unit is act·unit_gate; d act / d pre-activation: 1 where the unit is on (positive, kept)
            g_pre = torch.ops.aten.threshold_backward(g_act, act, 0).mul_(unit_gate)
            g_tokens = None
            if need_tokens:
                g_tokens = torch.bmm(g_pre, wd).to(t_dtype)
                if route is not None:
                    # The router's share of d/d tokens[:, 0]. Its graph (weight <- gates <- route) stays for the
                    # engine, which still delivers the router parameters' gradients.
                    (g_route,) = torch.autograd.grad(weight, route, g_weight, retain_graph=True)
                    g_tokens[:, 0] += g_route.to(t_dtype)
            g_params: list[torch.Tensor | None] = [None] * len(need_params)
            if any(need_params):
                g_wd = torch.bmm(g_pre.transpose(1, 2), x)  # (B, k·r, d)
                g_bd = g_pre.sum(1)  # (B, k·r)
                g_up = torch.bmm(g.transpose(1, 2), hidden)  # (B, d, k·r + k)
                for slot, u in enumerate(slots):
                    i, j = divmod(slot, k)
                    units = slice(j * r, (j + 1) * r)
                    pieces = (g_wd[i, units], g_bd[i, units], g_up[i, :, units], g_up[i, :, width + j])
                    for q, piece in enumerate(pieces):
                        n = 4 * u + q
                        if need_params[n]:
                            g_params[n] = piece if g_params[n] is None else g_params[n] + piece
                g_params = [None if gp is None else gp.to(dt) for gp, dt in zip(g_params, p_dtypes, strict=True)]
        return (g_tokens, g_weight if need_weight else None, None, None, None, *g_params)
