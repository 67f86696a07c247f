"""The experts of one block, shared by all tasks' routers, with activate-freeze state as buffers (method.md §3)."""

from __future__ import annotations

import torch
from torch import nn

from moecl.moe.expert import Expert


class ExpertPool(nn.Module):
    """E experts with separate parameters (frozen ones can be left out of the optimizer entirely).

    Buffers (saved in state_dict, so they survive checkpoints):
      frozen    (E,) bool   experts frozen for all later tasks
      frozen_at (E,) int64  index of the task after which each expert was frozen (-1: not frozen)
      usage     (E,) int64  samples routed to each expert during the current task (training forwards only)
      tasks_ended ()  int64 how many tasks have ended (the next task's index)
    """

    def __init__(self, dim: int, num_experts: int, bottleneck: int = 64, dropout: float = 0.1, scale: float = 0.1):
        super().__init__()
        self.experts = nn.ModuleList(Expert(dim, bottleneck, dropout, scale) for _ in range(num_experts))
        self.register_buffer("frozen", torch.zeros(num_experts, dtype=torch.bool))
        self.register_buffer("frozen_at", torch.full((num_experts,), -1, dtype=torch.long))
        self.register_buffer("usage", torch.zeros(num_experts, dtype=torch.long))
        self.register_buffer("tasks_ended", torch.zeros((), dtype=torch.long))
        # requires_grad is not in the state_dict: re-derive it from the loaded mask.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._apply_frozen())

    def __len__(self) -> int:
        return len(self.experts)

    def count(self, selected: torch.Tensor) -> None:
        """Add one count per sample per selected expert; `selected` is (B, E) bool."""
        self.usage += selected.sum(0).to(self.usage)

    def freeze_most_used(self, k: int) -> list[int]:
        """End of task: freeze the k most-used experts of this task (already frozen ones count towards the k, so
        fewer new ones get frozen); experts this task never used are never frozen. Resets usage. Returns the newly
        frozen indices."""
        usage = self.usage.cpu()
        newly = []
        if k > 0:
            order = torch.argsort(usage, descending=True, stable=True)[:k]
            newly = [int(e) for e in order if usage[e] > 0 and not bool(self.frozen[e])]
            for e in newly:
                self.frozen[e] = True
                self.frozen_at[e] = int(self.tasks_ended)
        self.usage.zero_()
        self.tasks_ended += 1
        self._apply_frozen()
        return newly

    def _apply_frozen(self) -> None:
        for expert, frozen in zip(self.experts, self.frozen.tolist(), strict=True):
            for p in expert.parameters():
                p.requires_grad_(not frozen)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for expert, f in zip(self.experts, self.frozen.tolist(), strict=True)
            if not f
            for p in expert.parameters()
        ]
