"""Smoke tests of the benchmark harness (never timing assertions): keys, finite positive values, and that the
reference dispatch styles it compares against compute the same function as the MoE adapter."""

from __future__ import annotations

import math

import pytest
import torch

from moecl import bench

CONTRACT_KEYS = {
    "moe": ("dim", "experts", "top_k", "ratio_vs_dense_adapter", "speedup_vs_all_experts", "speedup_vs_expert_loop"),
    "step": ("ratio_vs_frozen_backbone",),
    "selector": ("ratio_vs_backbone_forward", "autoencoders_ratio_vs_backbone_forward"),
    "data": ("img_s", "steps_per_s_fed", "workers_speedup", "first_batch_s"),
}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors on a shared 2-core machine: a second intra-op thread only adds contention (seconds, not ms).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _positive_finite(value) -> bool:
    if isinstance(value, dict):
        return all(_positive_finite(v) for v in value.values())
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("name", [n for n in bench.NAMES if n != "memory"])  # memory: tests/test_bench_memory.py
def test_tiny_run_returns_contract_keys_with_positive_finite_values(name):
    result = bench.run(name, tiny=True, repeats=2)
    for key in CONTRACT_KEYS[name]:
        assert _positive_finite(result[key]), (key, result[key])
    if name == "data":  # images/s of the train and eval pipelines, for every worker count measured
        assert set(result["img_s"]) == {"bundled train", "bundled eval"}
        assert all(set(row) == {"0 workers", "1 workers"} for row in result["img_s"].values())
        assert "img/s" in bench.format_result(name, result)
        return
    times = result.get("ms") or result["ms_per_image"]
    assert _positive_finite(times) and _positive_finite(result["peak_mib"])
    assert set(times) == set(result["peak_mib"])
    text = bench.format_result(name, result)
    assert all(key in text for key in CONTRACT_KEYS[name] if key.startswith(("ratio", "speedup")))
    if name == "moe":
        assert (result["experts"], result["top_k"]) == (22, 2)
        assert bench.MOE_VIT_B16.dim == 768  # the full-size run reports {"dim": 768, ...}


def test_unknown_benchmark_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown benchmark 'nope'.*moe, step, selector, data, memory"):
        bench.run("nope", tiny=True)


def test_cli_offers_every_benchmark():
    from moecl.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    choices = next(a for a in sub.choices["bench"]._actions if a.dest == "name").choices
    assert list(choices) == [*bench.NAMES, "dist"]  # dist launches processes: moecl.bench_dist


def test_reference_dispatch_styles_compute_the_adapter_function():
    scale = bench.LayerScale("t", dim=8, tokens=3, batch=6, experts=5, top_k=2, bottleneck=4)
    adapter = bench._random_adapter(scale, torch.device("cpu")).eval()  # eval: no routing noise, no dropout
    tokens = torch.randn(6, 3, 8)
    want = adapter(tokens, tokens[:, 0])
    assert want.abs().sum() > 0
    torch.testing.assert_close(bench.all_experts_reference(adapter, tokens, tokens[:, 0]), want)
    torch.testing.assert_close(bench.expert_loop_reference(adapter, tokens, tokens[:, 0]), want)


def test_measure_runs_every_variant_the_same_number_of_times():
    calls = {"a": 0, "b": 0}

    def variant(name):
        def fn():
            calls[name] += 1

        return fn

    out = bench.measure({"a": variant("a"), "b": variant("b")}, repeats=3, device=torch.device("cpu"), warmup=1)
    assert calls == {"a": 4, "b": 4}
    assert all(m.median_s >= 0 and m.peak_mib > 0 for m in out.values())
