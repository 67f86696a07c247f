"""Mixed precision, torch.compile and multi-process (HF accelerate, DDP) support for the engine's training step.

Every helper is a no-op for the default single-process fp32 run, so such a run is unchanged bit for bit.

Multi-process training (`accelerate launch --multi_gpu --num_processes N -m moecl train ...`, or `torchrun
--nproc_per_node N -m moecl train ...`; on a machine without GPUs both run N CPU processes over gloo). Each
process holds the whole learner on its own device (cuda:LOCAL_RANK) and collectives use tensors there:
- every process plans the same global batch (the batch order is a pure function of seed, task and step) and loads
  only its contiguous share of it (`Collectives.shard`); each image's augmentation is seeded by its position in the
  global batch, so it is the one a single process draws. The share's loss is weighted by n_share * N / n_batch
  (n_batch: readable rows of the global batch, one all-reduce), so the gradient DDP averages equals the gradient
  of the single-process batch mean (up to float summation order).
- evaluation and DDAS passes are sharded too (batches.py): each process evaluates every N-th batch of a dataset
  and the counts are summed; each DDAS feature batch is computed in shares and gathered in order, so every
  process fits the same autoencoders. Before each row the row's text classifiers are built with their class
  prompts shared out among the processes and the embeddings gathered (Learner.build_classifiers).
- DDP wraps exactly the parameters the optimizer trains (the frozen backbone is never broadcast); experts that no
  process used in a step keep grad None, as in one process.
- expert usage counts (activate-freeze) are summed over processes for the image tower (disjoint slices) and taken
  from the main process for the text tower (in training every process encodes all class prompts), before a task ends and
  before a checkpoint is written (the main process then carries the running total, see `sync_usage`).
- equivalence: with routing noise and dropout off, N processes give the single-process accuracy matrix up to
  float summation order (tested with 2 processes). With them on (the paper's setting), each process draws its own
  noise for its slice, so runs are statistically equivalent but not bitwise equal.
- only the main process writes the run directory (log, checkpoints, outputs); every process holds the same
  results after the sums.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from moecl.backbone.base import AdapterModule
from moecl.config import RunConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RECOMPILE_LIMIT = 32  # graphs per compiled block class (see compile_blocks)
# glibc mallopt parameters and the values tune_cpu_allocator sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for it
_TRIM_THRESHOLD = 64 << 20


def tune_cpu_allocator() -> bool:
    """Let glibc keep freed tensor memory for reuse instead of returning it to the OS after every step (process
    wide; the CLI calls it, library users may). With glibc's defaults a process can fall into handing back and
    re-faulting the few-MB activation tensors of every step: measured here for one MoE layer step, 1,900-2,900
    page faults and 3-5 ms of kernel time per step (11.5-12.7 ms instead of 9.4 ms), in some processes and not in
    others. The same remedy as the jemalloc/tcmalloc LD_PRELOAD that PyTorch's CPU tuning guide recommends.
    Returns whether the settings were applied (glibc only; MOECL_MALLOC_TUNING=0 turns it off)."""
    if os.environ.get("MOECL_MALLOC_TUNING", "1") == "0":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def adamw_options(params: list[nn.Parameter]) -> dict[str, bool]:
    """Keyword arguments for torch.optim.AdamW: the fused kernel when every parameter is a float tensor on CPU or
    CUDA. On CPU the default per-parameter loop costs ~10 small ops per trained tensor (hundreds of experts'
    tensors per step); the fused kernel is one call (measured 0.3 s instead of 2-3 s per ViT-B/16 step)."""
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if fused else {}


def is_main_process() -> bool:
    """False in the non-main processes of a multi-process launch (they must not write the run directory)."""
    return int(os.environ.get("RANK", "0")) == 0


def distributed_launch() -> bool:
    """True when started by `accelerate launch` / `torchrun` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """Autocast for "bf16"/"fp16"; a null context for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision])


def compile_blocks(module: nn.Module, **compile_kwargs: Any) -> int:
    """torch.compile, in place, every repeated block of `module`: the top-most elements of its nn.ModuleLists
    that hold parameters (CLIP / MiniLM encoder layers, EfficientNet blocks). Installed MoE adapters run eagerly
    inside them (their routing is data-dependent). Idempotent; returns how many blocks are compiled."""
    # One code object serves every block of a class: image and text towers, train and eval, grad or not at block 0
    # each need their own graph, more than dynamo's default of 8 per code object.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled = 0
    skip: list[str] = []
    in_adapters = {id(m) for a in module.modules() if isinstance(a, AdapterModule) for m in a.modules()}
    for name, child in module.named_modules():
        if any(name.startswith(prefix) for prefix in skip) or not isinstance(child, nn.ModuleList):
            continue
        for index, block in enumerate(child):
            if id(block) in in_adapters or not any(True for _ in block.parameters()):
                continue
            if getattr(block, "_compiled_call_impl", None) is None:
                # dynamic shapes: batch sizes and prompt counts vary between train / eval / tasks; without it every
                # new shape recompiles until dynamo's recompile limit sends the block back to eager mode
                block.compile(**{"dynamic": True, **compile_kwargs})
            compiled += 1
            skip.append(f"{name}.{index}." if name else f"{index}.")
    return compiled


def batch_slice(n: int, rank: int, world_size: int) -> slice:
    """Contiguous slice of a batch of n for process `rank` of `world_size`; sizes differ by at most one."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (1 if rank < extra else 0))


class Collectives:
    """What the processes of a launch compute together; in a single process every call is the identity.

    Each process handles a contiguous share (`shard`) of every batch; `sum` all-reduces counts, `gather_rows`
    concatenates per-process rows in rank order (shares may differ in length: skipped images), which restores the
    order of the whole batch. Collectives: every process must call them at the same points."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")  # NCCL only moves tensors on the process's GPU

    def shard(self, n: int) -> slice:
        return batch_slice(n, self.rank, self.world_size)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        out = values.to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(values.device)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return rows
        import torch.distributed as dist

        local = rows.to(self.device)
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(local)], device=self.device))
        longest = max(int(n) for n in sizes)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)]).to(rows.device)

    def gather_objects(self, value: Any) -> list[Any]:
        """A small picklable value of every process, in rank order."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


class _TrainedParameters(nn.Module):
    """What DDP wraps: forward = the learner's training loss; registered parameters = exactly the trained ones.

    The learner itself is held outside the module tree, so DDP neither broadcasts nor hooks the frozen backbone."""

    def __init__(self, learner: nn.Module, params: list[nn.Parameter]):
        super().__init__()
        self.trained = nn.ParameterList(params)
        object.__setattr__(self, "_learner", learner)

    def forward(self, batch: Any, index: int, task: Any) -> torch.Tensor:
        return self._learner.training_loss(batch, index, task)


class TrainingAccelerator:
    """The training-step plumbing the engine calls: autocast, loss scaling, compile, DDP and main-process gating."""

    def __init__(
        self,
        precision: str = "fp32",
        compile: bool = False,
        distributed: bool | None = None,
        device: torch.device | None = None,
    ):
        self.precision = precision
        self.compile = compile
        self.accelerator = None
        device = device or torch.device("cpu")  # the learner's device (the engine passes its placement)
        if distributed_launch() if distributed is None else distributed:
            from accelerate import Accelerator, DistributedDataParallelKwargs

            ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
            self.accelerator = Accelerator(cpu=device.type == "cpu", kwargs_handlers=[ddp])
        self.device_type = device.type  # prepare() follows the trained parameters
        self.collectives = Collectives(self.rank, self.world_size, device)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")
        self._loss: nn.Module | None = None
        self._last: Any = None  # a row of this process's last share (stands in for an empty share)

    @classmethod
    def from_config(cls, cfg: RunConfig, device: torch.device | None = None) -> TrainingAccelerator:
        return cls(cfg.optim.precision, cfg.optim.compile, device=device)

    # processes ------------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def is_main(self) -> bool:
        """Only this process writes the run directory."""
        return self.rank == 0

    def close(self) -> None:
        """At the end of a run: wait until every process is done (the main one writes the outputs last), then tear
        the process group down. A no-op in a single process; idempotent.

        The order matters. A process that exits while a peer still uses the group can abort in gloo's threads
        ("terminate called without an active exception"): hence the first barrier. And the DDP wrapper holds the
        process group: freed after destroy_process_group (at a function's return, at interpreter exit) it runs
        ~ProcessGroupGloo, which joins gloo's worker threads while this thread holds the GIL, and a worker still
        freeing the Python tensors of the last collective waits for the GIL forever (seen in 2 of 17 launches;
        py-spy: ~Reducer -> ~ProcessGroupGloo -> thread::join against ~AsyncAllgatherWork -> gil_scoped_acquire).
        So the wrapper is dropped and collected while the group is still registered (its destructor then only
        decrements a count), a second barrier waits, with the GIL released, until every worker thread has finished
        its last work and every process has dropped its wrapper, and only then is the group destroyed."""
        if self.accelerator is None:
            return
        import gc

        import torch.distributed as dist

        if not dist.is_initialized():
            return
        self.accelerator.wait_for_everyone()
        self._loss = self._last = None
        self.accelerator.free_memory()  # accelerate's references to the prepared module; gc.collect()
        gc.collect()
        self.accelerator.wait_for_everyone()
        dist.destroy_process_group()

    # the step -------------------------------------------------------------------------------------------------
    def prepare(self, learner: nn.Module, params: list[nn.Parameter]) -> None:
        """Before a task's training: compile the model's blocks (once) and, under a launcher, wrap this task's
        trained parameters in DDP (the trained set changes per task: new router, frozen experts)."""
        if params and params[0].device.type != self.device_type:  # autocast / loss scaling where the model is
            self.device_type = params[0].device.type
            self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.precision == "fp16")
        if self.compile:
            compile_blocks(learner.model)
        self._loss = None
        if self.accelerator is not None and params:
            self.accelerator.free_memory()  # drop the previous task's DDP wrapper (its gradient buckets)
            self._loss = self.accelerator.prepare_model(_TrainedParameters(learner, params))

    def global_rows(self, batch: Any) -> int:
        """Rows of the global batch (every process's share together): a collective under a launcher."""
        if self.accelerator is None:
            return len(batch)
        return int(self.collectives.sum(torch.tensor([len(batch)]))[0])

    def training_loss(self, learner: nn.Module, batch: Any, index: int, task: Any, global_rows: int) -> torch.Tensor:
        """Loss of this process's share `batch` of a global batch of `global_rows` rows, under autocast, weighted so
        that the DDP-averaged gradient equals the single-process one. Single process: exactly
        learner.training_loss under autocast."""
        with self.autocast():
            if self._loss is None:
                return learner.training_loss(batch, index, task)
            if not len(batch):  # every image of this share unreadable: join the collective with a zero gradient
                if self._last is None:
                    raise RuntimeError("a process got no readable image in its first training batch")
                return self._loss(self._last, index, task) * 0.0
            self._last = batch.rows(slice(0, 1))
            loss = self._loss(batch, index, task)
            return loss * (len(batch) * self.world_size / global_rows)

    def shard(self, n: int) -> slice:
        """This process's contiguous slice of a global batch of n."""
        return self.collectives.shard(n)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device_type)

    def eval_autocast(self) -> contextlib.AbstractContextManager:
        """Evaluation under the training precision where that is safe: bf16 everywhere (fp32's range), fp16 on
        CUDA only (its kernels accumulate in fp32; CPU fp16 autocast does not). fp32 runs evaluate in fp32. The
        DDAS selector always scores in fp32 (its thresholds were calibrated there)."""
        if self.precision == "bf16" or (self.precision == "fp16" and self.device_type == "cuda"):
            return autocast(self.precision, self.device_type)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)  # plain optimizer.step() when loss scaling is off
        self.scaler.update()

    # expert usage counts -------------------------------------------------------------------------------------
    def sync_usage(self, model: nn.Module | None, main_keeps: bool = False) -> None:
        """Combine the per-process expert usage counts (activate-freeze reads them): image-tower counts are summed
        (disjoint batch slices), text-tower counts are the main process's (every process encodes all prompts).
        Afterwards every process holds the combined counts; with `main_keeps` the other processes then zero theirs,
        so the main process carries the total so far (into a checkpoint) and the others count only what follows.
        A collective: every process must call it at the same point."""
        if self.accelerator is None or model is None:
            return
        from accelerate.utils import broadcast, reduce

        for key, usage in _usage_buffers(model):
            combined = reduce(usage.clone(), reduction="sum") if key.startswith("image") else broadcast(usage.clone())
            usage.copy_(combined)
        if main_keeps:
            self.drop_usage_copies(model)

    def drop_usage_copies(self, model: nn.Module | None) -> None:
        """After loading a checkpoint (every process loads the same counts): only the main process keeps them."""
        if self.accelerator is None or model is None or self.is_main:
            return
        for _, usage in _usage_buffers(model):
            usage.zero_()


def _usage_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Expert usage counts of every MoE adapter, keyed "<tower>_<block>" (none for a bare backbone)."""
    from moecl.moe.model import MoEAdapterModel

    if isinstance(model, MoEAdapterModel):
        for key, adapter in model.adapters.items():
            yield key, adapter.pool.usage


class NullLog:
    """RunLog stand-in for processes that must not write the run directory."""

    def write(self, record: Any, sync: bool | None = None) -> None:
        pass

    def records(self) -> list[dict]:
        return []

    def position(self) -> int:
        return 0

    def truncate_to(self, position: int) -> int:
        return 0

    def truncate_from(self, predicate: Any) -> int:
        return 0

    def clear(self) -> None:
        pass
