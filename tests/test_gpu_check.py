"""scripts/gpu_check.py runs every part end to end (tiny sizes, CPU), so the prepared GPU command cannot fail on a
typo when a GPU machine is lent: the JSON it prints has each part's figures and no error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_smoke_on_the_cpu():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    threads = torch.get_num_threads()
    try:
        summary = gpu_check.run(torch.device("cpu"), smoke=True, budget=600)
    finally:
        torch.set_num_threads(threads)
    parts = [k for k in summary if k[:2] in ("a_", "b_", "c_", "d_")]
    assert len(parts) == 4 and not [k for k in parts if "error" in summary[k] or "skipped" in summary[k]], summary
    parity = summary["a_quickstart_gpu_vs_cpu"]
    assert parity["within_tolerance"] and parity["max_cell_diff"] == 0.0  # the CPU against itself
    for label in ("fp32", "bf16", "bf16+compile"):
        assert summary["b_training_step"][label]["s_per_step"] > 0
    assert summary["c_evaluation"]["img_s_fp32"] > 0
    assert 0 < summary["d_pipeline_feed"]["gpu_busy_share"] <= 1
