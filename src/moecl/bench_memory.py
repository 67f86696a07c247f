"""`moecl bench memory`: host memory of a whole run against the size of its data (a scale model, not a test).

The real engine trains MoE-Adapters with DDAS at the paper's AlexNet feature width (43,264: a randomly initialised
AlexNet trunk, since its ImageNet weights cannot be downloaded here) on a synthetic stream (data/synthetic.py) of
3 tasks, a tiny random CLIP (hidden 32, 2+2 blocks) reading `image_size` px images, for N training images per task
(test images: N / 4, at least 64). Everything that does not depend on N is fixed: training and autoencoder
iterations, batch sizes, the reference set, and the memory budgets (data.cache_mb, selector.memory_mb; small, so
that they are reached already at the smallest N, as the paper's budgets are at paper scale). Each N runs in a fresh
child process (`python -m moecl.bench_memory SCALE N`), so its peak RSS (VmHWM) is that run's own. Data workers: 0,
so all the run's memory is in that one process.

Reported per N: peak RSS, RSS before the run starts (interpreter, torch, the models), evaluation images, forwards
and reused forwards, and the images DDAS sent to the zero-shot branch after a task was learned (reuse computes each
of those once: reused must equal that count). The goal: peak RSS at the largest N at most 10% above the previous N.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class MemoryScale:
    label: str
    sizes: tuple[int, ...]  # training images per task, one run each
    image_size: int
    tasks: int = 3
    classes: int = 5
    min_test: int = 64  # test images per task: max(min_test, N // 4)
    iterations: int = 10  # training steps per task
    batch_size: int = 8
    eval_batch_size: int = 32
    selector_iterations: int = 10
    selector_batch_size: int = 16
    reference_images: int = 200
    cache_mb: float = 64.0
    selector_memory_mb: float = 16.0  # < selector_iterations x batch x 173 KB: the fits stream, as at paper scale
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or any(n < 1 for n in self.sizes) or list(self.sizes) != sorted(self.sizes):
            raise ValueError(f"bench memory: sizes must be >= 2 increasing positive counts, got {self.sizes}")

    def test_images(self, n: int) -> int:
        return max(self.min_test, n // 4)


MEMORY_TINY = MemoryScale("tiny CLIP at 64 px, AlexNet-width DDAS, 3 tasks", sizes=(50, 100, 200), image_size=64)
MEMORY_FULL = MemoryScale(
    "tiny CLIP at 224 px, AlexNet-width DDAS, 3 tasks", sizes=(500, 2000, 8000), image_size=224
)


def _config(scale: MemoryScale, clip_dir: Path):
    from moecl.config import RunConfig

    return RunConfig.from_dict({
        "backbone": {"name": "clip", "model": str(clip_dir), "image_size": scale.image_size, "cache_prefix": True},
        "moe": {"num_experts": 22, "top_k": 2, "bottleneck": 8},
        "selector": {
            "enabled": True, "features": "alexnet", "iterations": scale.selector_iterations,
            "reference_iterations": scale.selector_iterations, "batch_size": scale.selector_batch_size,
            "memory_mb": scale.selector_memory_mb,
        },
        "optim": {
            "iterations": scale.iterations, "batch_size": scale.batch_size, "warmup_steps": 2,
            "eval_batch_size": scale.eval_batch_size,
        },
        "data": {"workers": 0, "cache_mb": scale.cache_mb, "reuse_eval": True},
        "seed": scale.seed,
    })  # fmt: skip


def memory_point(scale: MemoryScale, n: int) -> dict[str, Any]:
    """One run of the scale model with `n` training images per task, in this process (call it in a fresh one:
    the peak RSS is the process's)."""
    from moecl.backbone.clip import CLIPBackbone
    from moecl.backbone.tiny import write_tiny_clip
    from moecl.bench import _in_use, _rss_hwm_mib  # the other benchmarks' RSS readings (bench imports this module)
    from moecl.branches import ZERO_SHOT
    from moecl.data.synthetic import synthetic_dataset, synthetic_stream
    from moecl.engine import Engine
    from moecl.methods.moe_adapters import MoEAdaptersLearner
    from moecl.moe.model import MoEAdapterModel
    from moecl.selector.features import AlexNetFeatures, alexnet_trunk

    n_test = scale.test_images(n)
    with tempfile.TemporaryDirectory(prefix="moecl-bench-memory-") as tmp:
        clip_dir = write_tiny_clip(Path(tmp) / "clip", seed=scale.seed)
        cfg = _config(scale, clip_dir)
        stream = synthetic_stream(scale.tasks, scale.classes, n, n_test, scale.image_size, seed=scale.seed)
        reference = synthetic_dataset("reference", "train", 10, scale.reference_images, scale.image_size, scale.seed)
        torch.manual_seed(scale.seed)
        backbone = CLIPBackbone.from_pretrained(str(clip_dir), scale.image_size)
        features = AlexNetFeatures(alexnet_trunk(scale.seed))
        learner = MoEAdaptersLearner(MoEAdapterModel(backbone, cfg.moe), cfg, reference, features=features)
        engine = Engine(learner, stream, cfg, Path(tmp) / "run", quiet=True)
        before = _in_use(torch.device("cpu"))
        start = time.perf_counter()
        state = engine.run()
        wall = time.perf_counter() - start
        peak = _rss_hwm_mib()
    cost = state.evaluation_cost()
    routed = sum(
        counts.get(ZERO_SHOT, 0)
        for learned, per_dataset in learner.routing.items()
        if learned > 0
        for counts in per_dataset.values()
    )
    return {
        "n_train_per_task": n,
        "n_test_per_task": n_test,
        "peak_rss_mib": peak,
        "rss_before_run_mib": before,
        "evaluation_images": cost["images"],
        "evaluation_images_expected": (scale.tasks + 1) * scale.tasks * n_test,
        "evaluation_forwards": cost["forwards"],
        "evaluation_reused": cost["reused"],
        "zero_shot_routed_after_learning": routed,
        "last": state.matrix.last(),
        "wall_s": wall,
        "threads": torch.get_num_threads(),
    }


def memory_point_in_child(scale: MemoryScale, n: int) -> dict[str, Any]:
    """memory_point in a fresh interpreter (its own peak RSS); raises RuntimeError with its stderr if it fails."""
    src = str(Path(__file__).resolve().parents[1])  # the moecl this process runs, first on the child's path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "moecl.bench_memory", json.dumps(asdict(scale)), str(n)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench memory: the run with N={n} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory(scale: MemoryScale, device: torch.device | None = None, repeats: int | None = None) -> dict[str, Any]:
    """Peak RSS and evaluation cost per N (device and repeats are not used: one CPU run per N)."""
    points = []
    for k, n in enumerate(scale.sizes):
        print(f"bench memory: N={n} ({k + 1}/{len(scale.sizes)}) ...", file=sys.stderr, flush=True)
        points.append(memory_point_in_child(scale, n))
        p = points[-1]
        print(f"bench memory: N={n}: peak RSS {p['peak_rss_mib']:.0f} MiB, {p['wall_s']:.0f} s", file=sys.stderr)
    peaks = [p["peak_rss_mib"] for p in points]
    result = {
        "scale": scale.label,
        "sizes": list(scale.sizes),
        "image_size": scale.image_size,
        "budgets_mib": {"data.cache_mb": scale.cache_mb, "selector.memory_mb": scale.selector_memory_mb},
        "points": points,
        "ratio_peak_rss_largest_vs_previous": peaks[-1] / peaks[-2],
        "ratio_peak_rss_largest_vs_smallest": peaks[-1] / peaks[0],
        "ratio_data_largest_vs_previous": scale.sizes[-1] / scale.sizes[-2],
        "reuse_counts_zero_shot_once": all(p["evaluation_reused"] == p["zero_shot_routed_after_learning"] for p in points),
        "device": "cpu",
        "threads": points[0]["threads"],
        "repeats": 1,
        "memory": "peak RSS of the run's process (VmHWM, MiB)",
    }
    from moecl.bench import _targets  # (bench imports this module)

    result["targets_met"] = _targets(result)
    return result


def memory_table(result: dict[str, Any]) -> str:
    """The markdown table of docs/performance.md."""
    rows = [
        "| N train / test per task | peak RSS (MiB) | RSS before the run | eval images | forwards | reused | "
        "zero-shot-routed | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        rows.append(
            f"| {p['n_train_per_task']:,} / {p['n_test_per_task']:,} | {p['peak_rss_mib']:,.0f} | "
            f"{p['rss_before_run_mib']:,.0f} | {p['evaluation_images']:,} | {p['evaluation_forwards']:,} | "
            f"{p['evaluation_reused']:,} | {p['zero_shot_routed_after_learning']:,} | {p['wall_s']:,.0f} |"
        )
    return "\n".join(rows)


def _main(argv: list[str]) -> int:
    scale_json, n = argv
    data = json.loads(scale_json)
    scale = MemoryScale(**{**data, "sizes": tuple(data["sizes"])})
    from moecl.accel import tune_cpu_allocator

    tune_cpu_allocator()  # as `moecl train` does (MOECL_MALLOC_TUNING=0: glibc's defaults)
    print(json.dumps(memory_point(scale, int(n))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
