"""What a run needs to continue: its position in the stream, the results so far, and the optimizer's state as
plain tensors + JSON (no pickle), so a checkpoint restores it exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moecl.branches import ZERO_SHOT
from moecl.metrics import AccuracyMatrix


@dataclass
class RunState:
    """Position in the stream and the results so far (the learner's own statistics live in its state)."""

    task: int = 0  # index of the task being trained (== number of tasks fully done)
    step: int = 0  # optimiser steps done in that task
    matrix: AccuracyMatrix | None = None
    agnostic: AccuracyMatrix | None = None  # task-agnostic view (union label space), when the learner gives one
    timing: dict[str, float] = field(default_factory=dict)
    # What evaluation cost: per row ("0" = zero-shot) the images predicted and the image forwards that took
    # (fewer when results that cannot change were reused); a row evaluated again replaces its entry.
    evaluation: dict[str, dict[str, int]] = field(default_factory=dict)
    # images each process decoded in this invocation (not checkpointed: a cost, and a resumed run starts over)
    decoded: list[int] = field(default_factory=list)

    def set_evaluation_cost(self, learned: int, images: int, forwards: int) -> None:
        self.evaluation[str(learned)] = {"images": images, "forwards": forwards}

    def evaluation_cost(self) -> dict[str, int]:
        """Totals over the rows: images predicted, image forwards run, and images whose forward was reused."""
        images = sum(row["images"] for row in self.evaluation.values())
        forwards = sum(row["forwards"] for row in self.evaluation.values())
        return {"images": images, "forwards": forwards, "reused": max(0, images - forwards)}

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "step": self.step,
            "matrix": self.matrix.to_dict() if self.matrix else None,
            "agnostic": self.agnostic.to_dict() if self.agnostic else None,
            "timing": self.timing,
            "evaluation": self.evaluation,
        }

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        matrix = AccuracyMatrix.from_dict(data["matrix"]) if data.get("matrix") else None
        agnostic = AccuracyMatrix.from_dict(data["agnostic"]) if data.get("agnostic") else None
        evaluation = {row: dict(cost) for row, cost in data.get("evaluation", {}).items()}
        return cls(data["task"], data["step"], matrix, agnostic, dict(data.get("timing", {})), evaluation)

    def row_done(self, row: int) -> bool:
        """Whether row `row` of the matrix (ZERO_SHOT: the zero-shot row) holds a value for every dataset."""
        if self.matrix is None:
            return False
        values = self.matrix.zero_shot if row == ZERO_SHOT else self.matrix.row(row)
        return values is not None and all(v is not None and not math.isnan(v) for v in values)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(host tensors, JSON) of an optimizer's state_dict: tensors keyed "<param id>.<name>"."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, js: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of optimizer_state; torch moves each state tensor to its parameter's device."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in js.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": js["param_groups"]})
