"""Where a learner runs: the `device` setting turned into a torch.device, and the placement of tensors on it.

`resolve_device` is the one place that checks a requested device against the machine (the config only checks the
spelling). A `Placement` is what the engine hands every tensor through on its way to the learner: batches, restored
checkpoint tensors, prompt tokens. Its `dtype` is float32 in every real run; the device-consistency test places a
learner in float64, so that any floating tensor that reaches the learner without passing through the placement
(and so would sit on the wrong device on a GPU) shows up as float32 on this CPU-only machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from moecl.config import ConfigError

T = TypeVar("T")


def resolve_device(spec: str = "auto") -> torch.device:
    """"auto": the first CUDA device when there is one (under a multi-process launcher, the local rank's), else
    the CPU; "cpu"; "cuda" (same rule as auto, but an error without CUDA); "cuda:N". ConfigError (one line, meant for
    the user) when the device is not on this machine."""
    if spec == "cpu":
        return torch.device("cpu")
    if spec not in ("auto", "cuda") and not spec.startswith("cuda:"):
        raise ConfigError(f"device: {spec!r} is not allowed; it must be auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        if spec == "auto":
            return torch.device("cpu")
        built = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(
            f"device: {spec!r} asked for, but CUDA is not available here ({built}; torch {torch.__version__}); "
            "use --device cpu, or device: auto to take a GPU only when there is one"
        )
    count = torch.cuda.device_count()
    if spec.startswith("cuda:"):
        index = int(spec.split(":", 1)[1])
        if index >= count:
            raise ConfigError(f"device: {spec!r} asked for, but this machine has {count} CUDA device(s) (0..{count - 1})")
        return torch.device("cuda", index)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % count)  # one GPU per launched process


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 when it is in a lower precision (bf16/fp16 under autocast); float32/float64 stay as they are.
    Used where routing, selector scores and classifiers must not lose precision (and must not drop a float64
    learner to float32)."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


@dataclass(frozen=True)
class Placement:
    """The device (and float dtype) every tensor the learner touches lives in."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # floating tensors are cast to it; float64 only in the consistency test

    @classmethod
    def of(cls, spec: str | torch.device) -> Placement:
        return cls(spec if isinstance(spec, torch.device) else resolve_device(spec))

    @property
    def non_blocking(self) -> bool:
        # host-to-GPU copies from pinned memory overlap with compute; to the CPU there is nothing to overlap
        return self.device.type == "cuda"

    def put(self, x: T) -> T:
        """A tensor, or a dict/list/tuple of tensors (prompt tokens), on this placement; other values unchanged."""
        if isinstance(x, torch.Tensor):
            dtype = self.dtype if x.is_floating_point() else None
            return x.to(device=self.device, dtype=dtype, non_blocking=self.non_blocking)
        if isinstance(x, Mapping):
            return {k: self.put(v) for k, v in x.items()}  # type: ignore[return-value]
        if isinstance(x, (list, tuple)):
            return type(x)(self.put(v) for v in x)  # type: ignore[return-value]
        return x
