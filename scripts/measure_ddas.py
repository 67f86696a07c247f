"""Measure DDAS task selection on the quickstart stream with the lite backbone's features.

Replays what the engine does with the selector: the reference AE is fitted on the bundled ImageNet sample, then after
each task t (in stream order) that task's AE is fitted on its train split, and every test split is routed:
  task_selection_accuracy = share of test images of learned tasks routed to their own task,
  zero_shot_rate_unseen   = share of test images of not-yet-learned tasks sent to zero-shot,
both summed over all stages as in metrics.json. Features are cached (safetensors) so tuning the threshold rule only
re-trains the small autoencoders. Selector seeds move both rates by several points: --seeds gives their spread.

    .venv/bin/python scripts/measure_ddas.py                         # the run's features (lite: pooled Lite0)
    .venv/bin/python scripts/measure_ddas.py --features embedding    # the 256-d lite embedding instead
    .venv/bin/python scripts/measure_ddas.py --seeds 0 1 2 3 4 --set auto_quantile=0.95
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moecl.config import SelectorConfig, quickstart_config
from moecl.data.tasks import build_stream, reference_dataset, stream_data_root
from moecl.selector.ddas import ZERO_SHOT, AutoSelector, confusion_counts
from moecl.selector.features import squash

REFERENCE = "reference"


def _pixels(dataset, transform, batch_size: int):
    batch: list[torch.Tensor] = []
    for i in range(len(dataset)):
        image, _ = dataset[i]
        batch.append(transform(image))
        if len(batch) == batch_size or i == len(dataset) - 1:
            yield torch.stack(batch)
            batch = []


def extract(kind: str, image_size: int, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Selector features in (0, 1) of the reference images and of every quickstart split, keyed "<task>/<split>"."""
    from moecl.backbone import build_backbone
    from moecl.batches import frozen_prefix
    from moecl.selector.features import build_feature_extractor

    cfg = quickstart_config()
    backbone = build_backbone(dataclasses.replace(cfg.backbone, image_size=image_size))
    transform = backbone.image_transform(False)
    if kind == "backbone":
        features = build_feature_extractor("backbone", backbone)

        def fn(pixels: torch.Tensor) -> torch.Tensor:
            return features(frozen_prefix(backbone.image_prefix, pixels))  # the prefix as the engine's batches hold it
    elif kind == "embedding":

        def fn(pixels: torch.Tensor) -> torch.Tensor:
            return squash(backbone.encode_image(pixels))
    else:
        raise ValueError(f"--features must be backbone or embedding, got {kind!r}")
    stream = build_stream(cfg.stream)
    reference = reference_dataset(cfg.selector.reference, stream_data_root(cfg.stream), cfg.selector.reference_max_images)
    splits = {REFERENCE: reference}
    for task in stream.tasks:
        splits[f"{task.name}/train"], splits[f"{task.name}/test"] = task.train, task.test
    out = {}
    for key, ds in splits.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            out[key] = torch.cat([fn(p) for p in _pixels(ds, transform, batch_size)]).float().contiguous()
        print(f"  features {key}: {tuple(out[key].shape)} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return out


def simulate(feats: dict[str, torch.Tensor], names: list[str], cfg: SelectorConfig, seed: int) -> dict:
    """The engine's selector protocol over the stream (tasks in `names` order: safetensors files sort their keys);
    returns the two rates plus per-stage and confusion detail."""
    selector = AutoSelector(cfg, feats[REFERENCE].shape[1], seed=seed)
    if cfg.reference:
        selector.fit_reference(feats[REFERENCE])
    seen = [0, 0]
    unseen = [0, 0]
    stages = []
    confusion: dict[str, dict[str, int]] = {}
    for learned, name in enumerate(names, start=1):
        selector.fit_task(feats[f"{name}/train"])
        stage = {"learned": names[:learned], "per_dataset": {}}
        for j, other in enumerate(names):
            chosen = selector.select(feats[f"{other}/test"])
            if j < learned:
                ok = int((chosen == j).sum())
                seen[0], seen[1] = seen[0] + ok, seen[1] + len(chosen)
            else:
                ok = int((chosen == ZERO_SHOT).sum())
                unseen[0], unseen[1] = unseen[0] + ok, unseen[1] + len(chosen)
            stage["per_dataset"][other] = round(ok / len(chosen), 4)
            if learned == len(names):
                confusion_counts(chosen, other, names, into=confusion)
        ref_chosen = selector.select(feats[REFERENCE])
        stage["reference_zero_shot"] = round(float((ref_chosen == ZERO_SHOT).float().mean()), 4)
        stages.append(stage)
    return {
        "task_selection_accuracy": seen[0] / seen[1],
        "zero_shot_rate_unseen": unseen[0] / unseen[1],
        "thresholds": [round(t, 5) for t in selector.thresholds.tolist()],
        "stages": stages,
        "confusion_after_last_task": confusion,
    }


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = value if value == "auto" or not value else json.loads(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default="backbone", choices=["backbone", "embedding"])
    p.add_argument("--image-size", type=int, default=quickstart_config().backbone.image_size)
    p.add_argument("--cache", default="runs/ddas_features", help="folder for cached raw features")
    p.add_argument("--set", nargs="*", default=[], help="SelectorConfig overrides, e.g. auto_margin=1.5")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="selector seeds (the engine uses 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--detail", action="store_true", help="print per-stage rates and the final confusion table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache) / f"lite_{args.features}_{args.image_size}_v3.safetensors"
    if cache.exists():
        raw = load_file(str(cache))
    else:
        print(f"extracting {args.features} features at {args.image_size}px (cached in {cache})", file=sys.stderr)
        raw = extract(args.features, args.image_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(raw, str(cache))
    cfg = dataclasses.replace(quickstart_config().selector, **_parse_set(args.set))
    names = [t.name for t in build_stream(quickstart_config().stream).tasks]
    t0 = time.perf_counter()
    runs = [simulate(raw, names, cfg, seed) for seed in args.seeds]
    result = {
        "features": args.features,
        "dim": int(raw[REFERENCE].shape[1]),
        "selector": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("enabled", "reference_max_images")},
        "selector_fit_and_eval_s": round(time.perf_counter() - t0, 1),
        "seeds": args.seeds,
        "mean_task_selection_accuracy": sum(r["task_selection_accuracy"] for r in runs) / len(runs),
        "mean_zero_shot_rate_unseen": sum(r["zero_shot_rate_unseen"] for r in runs) / len(runs),
        "per_seed": runs if args.detail else [
            {k: v for k, v in r.items() if k not in ("stages", "confusion_after_last_task")} for r in runs
        ],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
