"""Build the small real-image subset shipped in the package (src/moecl/assets/data) from the full offline copies.

    python scripts/make_bundled_subset.py [--src /work/shared/data] [--out src/moecl/assets/data]

Same <split>/<class>/<file> layout, ZIP_STORED entries, fixed timestamps and a seeded choice of classes and images,
so running it twice gives byte-identical zips. Writes MANIFEST.json (counts, sha256) and LICENSES.md beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from moecl.data.sampling import generator

REPO = Path(__file__).resolve().parents[1]
MAX_SIDE = 128  # longer side of re-encoded images
JPEG_QUALITY = 85
SEED = 42
ZIP_DATE = (2024, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Plan:
    name: str
    splits: dict[str, int | None]  # split -> images per class (None: per-class cap does not apply)
    classes: int | None = None  # number of classes kept (None = all)
    total: dict[str, int] | None = None  # split -> total images (one-image-per-class datasets)


PLANS = (
    Plan("caltech101", {"train": 24, "test": 10}, classes=20),
    Plan("mnist", {"train": 40, "test": 20}),
    Plan("cifar10", {"train": 40, "test": 20}),
    Plan("clothing", {"train": 30, "test": 12}),
    Plan("imagenet_sample", {"test": None}, total={"test": 300}),
)


def _members(z: zipfile.ZipFile, split: str) -> dict[str, list[str]]:
    """class -> sorted member names of `split`."""
    out: dict[str, list[str]] = {}
    for name in z.namelist():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == split and parts[2]:
            out.setdefault(parts[1], []).append(name)
    return {c: sorted(v) for c, v in sorted(out.items())}


def _choose(items: list[str], k: int, *tag: object) -> list[str]:
    if len(items) <= k:
        return list(items)
    pick = generator(SEED, "bundled", *tag).permutation(len(items))[:k]
    return [items[i] for i in sorted(pick.tolist())]


def _encode(data: bytes) -> tuple[bytes, bool]:
    """Images with a side above MAX_SIDE are resized (LANCZOS, aspect kept) and saved as RGB JPEG q85."""
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) <= MAX_SIDE:
            return data, False
        img = img.convert("RGB")
        scale = MAX_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
        return buf.getvalue(), True


def build_one(plan: Plan, src: Path, out: Path) -> dict:
    with zipfile.ZipFile(src / f"{plan.name}.zip") as z:
        by_split = {s: _members(z, s) for s in plan.splits}
        classes = sorted(set.intersection(*(set(m) for m in by_split.values())))
        if plan.classes is not None:
            # well-populated classes only (enough images for every split), then a seeded choice among them
            full = [
                c
                for c in classes
                if all(k is None or len(by_split[s][c]) >= k for s, k in plan.splits.items())
            ]
            classes = sorted(_choose(full, plan.classes, plan.name, "classes"))
        chosen: dict[str, list[str]] = {}
        for split, k in plan.splits.items():
            if plan.total and split in plan.total:
                pool = [m for c in classes for m in by_split[split][c]]
                chosen[split] = _choose(pool, plan.total[split], plan.name, split)
            else:
                chosen[split] = [m for c in classes for m in _choose(by_split[split][c], k, plan.name, split, c)]
        target = out / f"{plan.name}.zip"
        counts: dict[str, dict[str, int]] = {}
        reencoded = 0
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
            for split, members in chosen.items():
                for member in members:
                    data, changed = _encode(z.read(member))
                    reencoded += changed
                    name = member if not changed else member.rsplit(".", 1)[0] + ".jpg"
                    info = zipfile.ZipInfo(name, ZIP_DATE)
                    info.compress_type = zipfile.ZIP_STORED
                    info.external_attr = 0o644 << 16
                    dst.writestr(info, data)
                    cls = member.split("/")[1]
                    counts.setdefault(split, {}).setdefault(cls, 0)
                    counts[split][cls] += 1
    data = target.read_bytes()
    return {
        "file": target.name,
        "splits": {s: sum(c.values()) for s, c in counts.items()},
        "num_classes": len({c for per in counts.values() for c in per}),
        "images_per_class": counts,
        "reencoded_images": reencoded,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }


LICENSE_HEADER = """# Bundled data: sources and licenses

Small subsets of five public image datasets, made by `scripts/make_bundled_subset.py` from the offline copies
described in /work/shared/data (README.md, MANIFEST.json), so `make quickstart` and the tests run on a fresh
clone without downloads. Layout `<split>/<class>/<file>`, zip entries stored uncompressed. Classes and images
were chosen with a fixed seed ({seed}); counts and SHA-256 of each zip are in MANIFEST.json.

Changes: images whose longer side exceeds {side} px were resized (LANCZOS, aspect ratio kept) to a longer side of
{side} px and saved as RGB JPEG quality {quality} (`.jpg`); smaller images (CIFAR-10 32x32 JPEG, MNIST 28x28 PNG)
keep their original bytes. The full copies were themselves re-encoded as described in their MANIFEST.

"""


def write_licenses(out: Path, src_manifest: dict, built: dict[str, dict]) -> None:
    lines = [LICENSE_HEADER.format(seed=SEED, side=MAX_SIDE, quality=JPEG_QUALITY)]
    for name, info in built.items():
        meta = src_manifest["datasets"][name]
        splits = ", ".join(f"{s} {n}" for s, n in info["splits"].items())
        lines.append(f"## {name}.zip\n")
        lines.append(f"- Content: {info['num_classes']} classes; {splits} images ({info['reencoded_images']} re-encoded).")
        lines.append(f"- Source: {meta['source']} (commit {meta['source_commit']}).")
        lines.append(f"- License: {meta['license']}")
        lines.append(f"- Changes in the full copy: {meta['changes']}\n")
    (out / "LICENSES.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "src" / "moecl" / "assets" / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    src_manifest = json.loads((args.src / "MANIFEST.json").read_text(encoding="utf-8"))
    built = {}
    for plan in PLANS:
        built[plan.name] = build_one(plan, args.src, args.out)
        print(f"{plan.name}: {built[plan.name]['splits']} ({built[plan.name]['bytes'] / 1e6:.2f} MB)")
    for name, info in built.items():
        meta = src_manifest["datasets"][name]
        info.update(source=meta["source"], source_commit=meta["source_commit"], license=meta["license"])
    manifest = {
        "description": "Bundled subset of /work/shared/data made by scripts/make_bundled_subset.py (seeded).",
        "seed": SEED,
        "max_side": MAX_SIDE,
        "datasets": built,
        "total_bytes": sum(i["bytes"] for i in built.values()),
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    write_licenses(args.out, src_manifest, built)
    print(f"total {manifest['total_bytes'] / 1e6:.2f} MB -> {args.out}")


if __name__ == "__main__":
    main()
