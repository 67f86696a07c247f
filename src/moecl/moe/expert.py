"""One expert: a bottleneck adapter (method.md §2)."""

from __future__ import annotations

import math

import torch
from torch import nn


class Expert(nn.Module):
    """Linear(d→bottleneck) → ReLU → Dropout → Linear(bottleneck→d), times `scale`; no LayerNorm.

    The up projection and both biases start at zero, so a new expert outputs exactly 0 (the block is unchanged).
    """

    def __init__(self, dim: int, bottleneck: int = 64, dropout: float = 0.1, scale: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale
