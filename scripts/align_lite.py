"""Make the lite backbone's heads (src/moecl/assets/lite/) and measure the backbone's zero-shot accuracy.

    .venv/bin/python scripts/align_lite.py                 # fit + write the assets + zero-shot evaluation
    .venv/bin/python scripts/align_lite.py --eval-only     # re-measure the shipped assets

Data: only the 1000 bundled ImageNet-sample images (one per class) and their class names; no evaluation dataset
(CIFAR-10, MNIST, Caltech101, clothing) is used for fitting. Deterministic (seeded views, seeded folds).

How (measured alternatives are in lite_backbone.md and the issue notes):
1. Text head: MiniLM embeddings of "<template>".format(name) for the 1000 ImageNet class names, averaged over the
   templates -> concept vectors C (1000 x 384). Text projection = centred PCA of C to `--dim`: centring removes the
   direction all "a photo of a ..." prompts share, which otherwise dominates cosine similarities.
2. Image head: Lite0's own ImageNet classifier, softmax(logits / T), mixes the projected concept vectors.
3. T and the logit scale: fitted with the CLIP loss (image -> text cross-entropy) in 5-fold leave-classes-out
   zero-shot: for each fold 200 classes are hidden from the classifier (logits masked) and from the PCA, and their
   images (several augmented views each) must be matched to their class prompts through the other 800 concepts.
   That makes T and the scale right for classes the heads have never seen, which is what zero-shot needs.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from moecl.backbone.lite import (  # noqa: E402
    ASSETS,
    PROJECTIONS,
    PROJECTIONS_META,
    LiteBackbone,
    LiteProjections,
    file_sha256,
    load_lite_towers,
)
from moecl.backbone.transforms import ImageTransform  # noqa: E402
from moecl.data.templates import IMAGENET_CLASSNAMES, TEMPLATES, classnames_for, templates_for  # noqa: E402

VERSION = "lite-align-v1"
# Generic photo templates (CLIP's CIFAR list): describe an ImageNet class the way zero-shot prompts describe classes.
CONCEPT_TEMPLATES = TEMPLATES["cifar100"]
# (dataset, split, images: None = all, else a seeded subset of this many)
EVALUATIONS = (
    ("cifar10", "test", None),
    ("mnist", "test", 2000),
    ("clothing", "test", None),
    ("caltech101", "test", None),
)


def read_split(zip_path: Path, split: str) -> tuple[list[str], list[str]]:
    """(sorted member names of `split`, sorted class folders) of an ImageFolder zip."""
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if n.startswith(f"{split}/") and not n.endswith("/"))
    folders = sorted({n.split("/")[1] for n in names})
    return names, folders


def load_images(zip_path: Path, names: list[str]) -> list[Image.Image]:
    with zipfile.ZipFile(zip_path) as z:
        return [Image.open(io.BytesIO(z.read(n))).convert("RGB") for n in names]


@torch.no_grad()
def view_logits(backbone: LiteBackbone, images: list[Image.Image], views: int, seed: int, batch: int) -> torch.Tensor:
    """ImageNet logits (N, views, 1000): the eval view, its mirror, then seeded RandomResizedCrops (scale 0.5-1)."""
    size = backbone.image_size
    center = ImageTransform(size, tf_style=True)
    crop = ImageTransform(size, tf_style=True, train=True, scale=(0.5, 1.0))
    rng = random.Random(seed)
    out = []
    for v in range(views):
        if v == 0:
            pixels = [center(im) for im in images]
        elif v == 1:
            pixels = [center(im.transpose(Image.FLIP_LEFT_RIGHT)) for im in images]
        else:
            pixels = [crop(im.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im, rng) for im in images]
        logits = [
            backbone.class_logits(backbone.image_prefix(torch.stack(pixels[i : i + batch])))
            for i in range(0, len(pixels), batch)
        ]
        out.append(torch.cat(logits))
        print(f"  view {v + 1}/{views}", flush=True)
    return torch.stack(out, dim=1)


@torch.no_grad()
def concept_vectors(backbone: LiteBackbone, names: list[str], templates: tuple[str, ...], batch: int) -> torch.Tensor:
    """(len(names), 384): normalised mean over templates of the normalised MiniLM prompt embeddings."""
    prompts = [t.format(n) for n in names for t in templates]
    feats = torch.cat(
        [backbone.text_features(backbone.tokenize(prompts[i : i + batch])) for i in range(0, len(prompts), batch)]
    )
    return F.normalize(feats.view(len(names), len(templates), -1).mean(dim=1), dim=-1)


def centred_pca(vectors: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (dim, d), bias (dim,)) of x -> (x - mean) @ V[:dim].T."""
    mean = vectors.mean(dim=0)
    _, _, vh = torch.linalg.svd(vectors - mean, full_matrices=False)
    weight = vh[:dim].contiguous()
    return weight, -(mean @ weight.T)


def fit_heads(
    concepts: torch.Tensor, logits: torch.Tensor, dim: int, folds: int, steps: int, seed: int
) -> tuple[LiteProjections, dict]:
    """Projections from `concepts` (1000, 384) and class logits of the views (1000 images, V, 1000 classes)."""
    n = concepts.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fold_data = []
    for held in perm.chunk(folds):
        held = held.sort().values
        seen = torch.ones(n, dtype=torch.bool)
        seen[held] = False
        weight, bias = centred_pca(concepts[seen], dim)
        projected = concepts @ weight.T + bias
        mask = torch.where(seen, 0.0, -1e4)  # hidden classes: the classifier cannot name them
        fold_data.append((logits[held] + mask, projected, F.normalize(projected[held], dim=-1)))
    log_t = torch.zeros((), requires_grad=True)
    log_s = torch.tensor(3.0, requires_grad=True)
    opt = torch.optim.Adam([log_t, log_s], lr=0.05)
    for _ in range(steps):
        loss, correct, total = torch.zeros(()), 0, 0
        for fold_logits, projected, text in fold_data:
            image = F.normalize((fold_logits / log_t.exp()).softmax(dim=-1) @ projected, dim=-1)
            scores = (log_s.exp() * image @ text.T).flatten(0, 1)
            target = torch.arange(text.shape[0]).repeat_interleave(fold_logits.shape[1])
            loss = loss + F.cross_entropy(scores, target) / folds
            correct += int((scores.argmax(dim=1) == target).sum())
            total += len(target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weight, bias = centred_pca(concepts, dim)
    heads = LiteProjections(dim, n)
    with torch.no_grad():
        heads.text.weight.copy_(weight)
        heads.text.bias.copy_(bias)
        heads.concepts.copy_(concepts @ weight.T + bias)
        heads.log_temperature.copy_(log_t.detach())
        heads.log_logit_scale.copy_(log_s.detach())
    fit = {
        "temperature": round(float(log_t.exp()), 4),
        "logit_scale": round(float(log_s.exp()), 4),
        "folds": folds,
        "steps": steps,
        "optimizer": "Adam lr 0.05 on log T and log scale; init T=1, scale=e^3",
        "heldout_class_top1": round(100.0 * correct / total, 2),  # last step, all views, 200-way per fold
        "heldout_class_loss": round(float(loss), 4),
    }
    return heads, fit


@torch.no_grad()
def zero_shot(backbone: LiteBackbone, zip_path: Path, dataset: str, split: str, limit: int | None, batch: int) -> dict:
    """Top-1 (%) with the project's class names and templates (mean of the normalised template embeddings)."""
    names, folders = read_split(zip_path, split)
    subset = "all"
    if limit is not None and len(names) > limit:
        names = sorted(random.Random(0).sample(names, limit))
        subset = f"seeded random {limit} (random.Random(0).sample of the sorted member names)"
    classnames, templates = classnames_for(dataset, folders), templates_for(dataset)
    prompts = [t.format(c) for c in classnames for t in templates]
    text = torch.cat(
        [backbone.encode_text(backbone.tokenize(prompts[i : i + 256])) for i in range(0, len(prompts), 256)]
    )
    classifier = F.normalize(text.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)
    transform = backbone.image_transform(False)
    correct = 0
    for i in range(0, len(names), batch):
        chunk = names[i : i + batch]
        pixels = torch.stack([transform(im) for im in load_images(zip_path, chunk)])
        labels = torch.tensor([folders.index(n.split("/")[1]) for n in chunk])
        correct += int(((backbone.encode_image(pixels) @ classifier.T).argmax(dim=1) == labels).sum())
    return {
        "accuracy": round(100.0 * correct / len(names), 2),
        "images": len(names),
        "split": split,
        "subset": subset,
        "classes": len(classnames),
        "templates": len(templates),
        "chance": round(100.0 / len(classnames), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"), help="folder with the dataset zips")
    parser.add_argument("--out", type=Path, default=ASSETS, help="where projections.safetensors/.json go")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256, help="shared embedding dimension")
    parser.add_argument("--views", type=int, default=8, help="views per ImageNet-sample image (>= 2)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-only", action="store_true", help="only re-measure zero-shot of the assets in --out")
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()
    image, text, tokenizer = load_lite_towers(args.image_size, pretrained=True)
    meta_path = args.out / PROJECTIONS_META
    if args.eval_only:
        heads, meta = LiteProjections.load(args.out)
    else:
        zip_path = args.data / "imagenet_sample.zip"
        names, wnids = read_split(zip_path, "test")
        if [n.split("/")[1] for n in names] != wnids:
            raise SystemExit(f"error: {zip_path}: expected exactly one image per class folder")
        # Placeholder heads: only the frozen towers are used while fitting.
        backbone = LiteBackbone(image, text, LiteProjections(args.dim), tokenizer, args.image_size)
        print(f"ImageNet sample: {len(names)} images x {args.views} views", flush=True)
        logits = view_logits(backbone, load_images(zip_path, names), args.views, args.seed, args.batch)
        top1 = float((logits[:, 0].argmax(dim=1) == torch.arange(len(wnids))).float().mean()) * 100
        concepts = concept_vectors(backbone, [IMAGENET_CLASSNAMES[w] for w in wnids], CONCEPT_TEMPLATES, 256)
        heads, fit = fit_heads(concepts, logits, args.dim, args.folds, args.steps, args.seed)
        print(f"fit: {fit}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in heads.state_dict().items()}
        save_file(tensors, str(args.out / PROJECTIONS), metadata={"version": VERSION})
        meta = {
            "version": VERSION,
            "embed_dim": args.dim,
            "made_by": "scripts/align_lite.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "image_size": args.image_size,
            "data": {
                "file": "imagenet_sample.zip",
                "sha256": file_sha256(zip_path),
                "images": len(names),
                "class_names": "MANIFEST.json wnid_to_name (= moecl.data.templates.IMAGENET_CLASSNAMES)",
                "lite0_top1_eval_view": round(top1, 2),
            },
            "views": f"{args.views}: eval view, its mirror, seeded RandomResizedCrop(scale 0.5-1, random mirror)",
            "concept_templates": list(CONCEPT_TEMPLATES),
            "text_head": f"centred PCA of the 1000 concept vectors to {args.dim} dims",
            "image_head": "softmax(Lite0 ImageNet logits / T) @ projected concept vectors",
            "fit": fit,
            "seed": args.seed,
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        }
    meta["weights_sha256"] = file_sha256(args.out / PROJECTIONS)
    if not args.skip_eval:
        backbone = LiteBackbone(image, text, heads, tokenizer, args.image_size, projections_meta=meta)
        results = {}
        for dataset, split, limit in EVALUATIONS:
            zip_path = args.data / f"{dataset}.zip"
            if not zip_path.is_file():
                print(f"skip {dataset}: {zip_path} not found", flush=True)
                continue
            tic = time.time()
            results[dataset] = zero_shot(backbone, zip_path, dataset, split, limit, args.batch)
            print(f"zero-shot {dataset}: {results[dataset]} ({time.time() - tic:.0f}s)", flush=True)
        meta["zero_shot"] = {"image_size": args.image_size, **results}
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {meta_path} ({time.time() - started:.0f}s)")
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    raise SystemExit(main())
