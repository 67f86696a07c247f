"""MoE adapters vs a linear probe on the frozen lite backbone, one bundled dataset, a few hundred training images.

    .venv/bin/python scripts/lite_probe_vs_moe.py [--dataset clothing] [--per-class 40] [--iterations 200]

Both see the same seeded training subset and are tested on the whole test split:
- linear probe: multinomial logistic regression on Lite0's frozen pooled 1280-d features (full-batch L-BFGS);
- MoE adapters: MoEAdapterModel (paper's expert/router values, one task) in every MiniLM block and the last
  `--image-blocks` Lite0 blocks, trained as MoE-Adapters trains a task: logits = logit_scale * cos(image, prompt of
  each class), cross-entropy with label smoothing 0.2, AdamW, cosine schedule with warmup. The frozen image prefix is
  computed once per image through PrefixCache.
Prints one JSON object (accuracies in %, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from align_lite import load_images  # noqa: E402

from moecl.backbone.cache import PrefixCache, PrefixContext  # noqa: E402
from moecl.backbone.lite import LiteBackbone  # noqa: E402
from moecl.config import BackboneConfig, MoEConfig  # noqa: E402
from moecl.data.templates import classnames_for, templates_for  # noqa: E402
from moecl.moe.model import MoEAdapterModel  # noqa: E402
from moecl.params import ParameterParts, parameter_counts  # noqa: E402


def split_members(zip_path: Path, split: str) -> tuple[list[str], list[str]]:
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if n.startswith(f"{split}/") and not n.endswith("/"))
    return names, sorted({n.split("/")[1] for n in names})


def per_class_subset(names: list[str], per_class: int, seed: int) -> list[str]:
    by_class: dict[str, list[str]] = {}
    for n in names:
        by_class.setdefault(n.split("/")[1], []).append(n)
    rng = random.Random(seed)
    return sorted(m for members in by_class.values() for m in rng.sample(members, min(per_class, len(members))))


def prefixes(model: MoEAdapterModel, cache: PrefixCache, zip_path: Path, names: list[str], batch: int) -> torch.Tensor:
    transform = model.image_transform(False)
    context = PrefixContext.of(model.backbone, transform)
    out = []
    for i in range(0, len(names), batch):
        chunk = names[i : i + batch]

        def compute(positions: list[int], chunk: list[str] = chunk) -> torch.Tensor:
            images = load_images(zip_path, [chunk[p] for p in positions])
            return model.image_prefix(torch.stack([transform(im) for im in images]))

        out.append(cache.fetch(chunk, compute, context))
    return torch.cat(out)


@torch.no_grad()
def pooled_features(backbone: LiteBackbone, prefix: torch.Tensor, batch: int) -> torch.Tensor:
    """Lite0's pooled 1280-d features (what a linear probe reads), from cached prefixes."""
    net, out = backbone.image_model, []
    for i in range(0, len(prefix), batch):
        x = prefix[i : i + batch]
        for index in range(backbone.prefix_boundary(), len(net._blocks)):
            x = backbone._run_block(index, x)
        out.append(net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3)))
    return torch.cat(out)


def linear_probe(train_x, train_y, test_x, test_y, classes: int, weight_decay: float) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(train_x), train_y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((probe(test_x).argmax(1) == test_y).float().mean()) * 100


def moe_accuracy(model, test_prefix, test_y, tokens, templates: int, classes: int, task, batch: int) -> float:
    model.eval()
    with torch.no_grad():
        text = model.encode_text(tokens, task=task).view(classes, templates, -1).mean(1)
        text = F.normalize(text, dim=-1)
        correct = 0
        for i in range(0, len(test_prefix), batch):
            image = model.image_suffix(test_prefix[i : i + batch], task=task)
            correct += int(((image @ text.T).argmax(1) == test_y[i : i + batch]).sum())
    return 100.0 * correct / len(test_y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--image-blocks", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--probe-wd", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()
    zip_path = args.data / f"{args.dataset}.zip"
    train_names, folders = split_members(zip_path, "train")
    train_names = per_class_subset(train_names, args.per_class, args.seed)
    test_names, test_folders = split_members(zip_path, args.test_split)
    assert test_folders == folders, "train and test class folders differ"
    classnames, templates = classnames_for(args.dataset, folders), templates_for(args.dataset)
    label = {f: i for i, f in enumerate(folders)}
    train_y = torch.tensor([label[n.split("/")[1]] for n in train_names])
    test_y = torch.tensor([label[n.split("/")[1]] for n in test_names])

    cfg = BackboneConfig(name="lite", image_size=args.image_size, lite_image_blocks=args.image_blocks)
    backbone = LiteBackbone.from_config(cfg)
    model = MoEAdapterModel(backbone, MoEConfig())
    cache = PrefixCache()
    tic = time.time()
    train_prefix = prefixes(model, cache, zip_path, train_names, 64)
    test_prefix = prefixes(model, cache, zip_path, test_names, 64)
    prefix_s = time.time() - tic

    eval_tokens = model.tokenize([t.format(c) for c in classnames for t in templates])
    zero_shot = moe_accuracy(model, test_prefix, test_y, eval_tokens, len(templates), len(classnames), None, 64)

    tic = time.time()
    probe = linear_probe(
        pooled_features(backbone, train_prefix, 64),
        train_y,
        pooled_features(backbone, test_prefix, 64),
        test_y,
        len(classnames),
        args.probe_wd,
    )
    probe_s = time.time() - tic

    tic = time.time()
    task = model.add_task()
    params = model.trainable_parameters(task)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.iterations - args.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    train_tokens = model.tokenize([templates[0].format(c) for c in classnames])  # the training prompt
    g = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    for _ in range(args.iterations):
        if len(order) < args.batch:
            order += torch.randperm(len(train_y), generator=g).tolist()
        idx, order = order[: args.batch], order[args.batch :]
        model.train()
        image = model.image_suffix(train_prefix[idx], task=task)
        text = model.encode_text(train_tokens, task=task)
        logits = model.logit_scale * image @ text.T
        loss = F.cross_entropy(logits, train_y[idx], label_smoothing=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    moe_s = time.time() - tic
    moe = moe_accuracy(model, test_prefix, test_y, eval_tokens, len(templates), len(classnames), task, 64)
    result = {
        "dataset": args.dataset,
        "train_images": len(train_y),
        "test_images": len(test_y),
        "image_size": args.image_size,
        "zero_shot": round(zero_shot, 2),
        "linear_probe": round(probe, 2),
        "moe_adapters": round(moe, 2),
        "moe_params": parameter_counts(ParameterParts(model, tuple(model.adapters.parameters())))["moe"],
        "iterations": args.iterations,
        "batch": args.batch,
        "lr": args.lr,
        "seconds": {"prefix": round(prefix_s, 1), "probe": round(probe_s, 1), "moe_train": round(moe_s, 1)},
        "total_seconds": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
