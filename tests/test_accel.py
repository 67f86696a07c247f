"""Mixed precision, compile and process-slicing helpers (the 2-process run itself: tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moecl.accel import NullLog, TrainingAccelerator, autocast, batch_slice, compile_blocks
from moecl.backbone.base import AdapterModule
from moecl.batches import Batch
from moecl.config import ConfigError, RunConfig


class _Learner(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Linear(8, 3)

    def training_loss(self, batch, index, task):
        return nn.functional.cross_entropy(self.model(batch.prefix), batch.labels)


def _batch(x: torch.Tensor, y: torch.Tensor) -> Batch:
    return Batch([str(i) for i in range(len(y))], y, x)


def test_precision_is_validated_in_the_config():
    assert RunConfig.from_dict({"optim": {"precision": "bf16", "compile": True}}).optim.compile
    with pytest.raises(ConfigError, match="optim.precision: 'fp8' is not one of fp32, bf16, fp16"):
        RunConfig.from_dict({"optim": {"precision": "fp8"}})


def test_autocast_fp32_is_a_no_op_and_bf16_computes_in_bf16():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16


def test_single_process_default_is_the_plain_training_step():
    learner, plain = _Learner(), _Learner()
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    accel = TrainingAccelerator.from_config(RunConfig())
    assert (accel.is_main, accel.world_size, accel.accelerator) == (True, 1, None)
    accel.prepare(learner, list(learner.parameters()))
    opt_a = torch.optim.AdamW(learner.parameters(), lr=0.1)
    opt_b = torch.optim.AdamW(plain.parameters(), lr=0.1)
    loss = accel.training_loss(learner, _batch(x, y), 0, None, 6)
    accel.backward(loss)
    accel.step(opt_a)
    plain.training_loss(_batch(x, y), 0, None).backward()
    opt_b.step()
    assert torch.equal(learner.model.weight, plain.model.weight)
    accel.sync_usage(learner.model)  # no-ops in one process
    accel.drop_usage_copies(learner.model)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_steps_train(precision):
    learner = _Learner()
    before = learner.model.weight.detach().clone()
    accel = TrainingAccelerator(precision)
    accel.prepare(learner, list(learner.parameters()))
    opt = torch.optim.AdamW(learner.parameters(), lr=0.1)
    loss = accel.training_loss(learner, _batch(torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])), 0, None, 6)
    assert torch.isfinite(loss)
    accel.backward(loss)
    accel.step(opt)
    assert learner.model.weight.dtype == torch.float32  # master weights stay fp32
    assert torch.isfinite(learner.model.weight).all() and not torch.equal(learner.model.weight, before)


@pytest.mark.parametrize(("n", "world"), [(5, 2), (4, 2), (1, 2), (7, 3), (64, 8)])
def test_batch_slices_partition_the_batch(n, world):
    slices = [batch_slice(n, r, world) for r in range(world)]
    assert [i for s in slices for i in range(n)[s]] == list(range(n))
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1


class _Adapter(AdapterModule):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        return sum(e(x) for e in self.experts)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4)])) for _ in range(2)]
        )
        self.adapter = _Adapter()
        self.empty = nn.ModuleList([nn.ReLU()])

    def forward(self, x):
        for layer in self.layers:
            x = layer[1][0](layer[0](x))
        return x + self.adapter(x)


def test_compile_blocks_compiles_top_level_repeated_blocks_only():
    net = _Net()
    x = torch.randn(3, 4)
    want = net(x)
    assert compile_blocks(net, backend="eager") == 2
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in net.layers)
    assert getattr(net.layers[0][1][0], "_compiled_call_impl", None) is None  # nested: inside a compiled block
    assert all(getattr(e, "_compiled_call_impl", None) is None for e in net.adapter.experts)  # adapters stay eager
    assert compile_blocks(net, backend="eager") == 2  # idempotent
    torch.testing.assert_close(net(x), want)


def test_null_log_has_the_runlog_interface():
    log = NullLog()
    log.write({"event": "step"})
    assert (log.records(), log.position(), log.truncate_to(5), log.truncate_from(lambda r: True)) == ([], 0, 0, 0)
    log.clear()


def test_cpu_allocator_tuning_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from moecl.accel import tune_cpu_allocator

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert tune_cpu_allocator() is True
    monkeypatch.setenv("MOECL_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is False


def test_evaluation_runs_under_the_training_precision_where_safe():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with TrainingAccelerator("bf16").eval_autocast():
        assert (a @ b).dtype == torch.bfloat16
    for precision in ("fp32", "fp16"):  # fp16 evaluates under autocast on CUDA only
        with TrainingAccelerator(precision).eval_autocast():
            assert (a @ b).dtype == torch.float32
