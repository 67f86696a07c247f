"""`moecl bench memory` on a micro scale: one child run per size, the counts it reports are consistent (never a
memory or timing assertion: those are the benchmark's, measured on a quiet machine)."""

from __future__ import annotations

import dataclasses

import pytest

from moecl import bench
from moecl.bench_memory import MEMORY_FULL, MemoryScale, bench_memory, memory_table

MICRO = MemoryScale(
    "micro", sizes=(6, 12), image_size=32, tasks=2, classes=2, min_test=6, iterations=2, batch_size=4,
    eval_batch_size=8, selector_iterations=2, selector_batch_size=4, reference_images=8,
)  # fmt: skip


def test_micro_scale_reports_consistent_counts_per_size():
    result = bench_memory(MICRO)
    assert [p["n_train_per_task"] for p in result["points"]] == [6, 12]
    for p in result["points"]:
        # every test image of every dataset is evaluated in the zero-shot row and after each task
        assert p["evaluation_images"] == p["evaluation_images_expected"] == (2 + 1) * 2 * p["n_test_per_task"]
        assert p["evaluation_forwards"] + p["evaluation_reused"] == p["evaluation_images"]
        # an image DDAS sends to the zero-shot branch reuses the zero-shot row's embedding: forwarded once
        assert p["evaluation_reused"] == p["zero_shot_routed_after_learning"]
        assert p["peak_rss_mib"] >= p["rss_before_run_mib"] > 0
        assert 0 <= p["last"] <= 100
    peaks = [p["peak_rss_mib"] for p in result["points"]]
    assert result["ratio_peak_rss_largest_vs_previous"] == pytest.approx(peaks[1] / peaks[0])
    assert result["reuse_counts_zero_shot_once"] is True
    assert list(result["targets_met"]) == ["ratio_peak_rss_largest_vs_previous <= 1.1"]
    text = bench.format_result("memory", result)
    assert "N=6" in text and "N=12" in text and "ratio_peak_rss_largest_vs_previous" in text
    assert memory_table(result).count("\n") == 1 + len(MICRO.sizes)


def test_scale_sizes_are_validated_and_full_scale_is_the_issues():
    assert MEMORY_FULL.sizes == (500, 2000, 8000) and MEMORY_FULL.image_size == 224
    assert MEMORY_FULL.test_images(8000) == 2000 and MEMORY_FULL.test_images(100) == 64
    with pytest.raises(ValueError, match="increasing"):
        dataclasses.replace(MICRO, sizes=(12, 6))
    with pytest.raises(ValueError, match="increasing"):
        dataclasses.replace(MICRO, sizes=(12,))
