"""Regenerate the data block of src/moecl/data/templates.py from the protocol files.

    python scripts/make_templates.py [--docs /work/shared/docs] [--manifest /work/shared/data/MANIFEST.json]

Reads prompts.yaml (templates + hand-written class names of the MTIL datasets), class_orders.yaml (CIL orders) and
the ImageNet wnid -> name table of the data MANIFEST, and rewrites only the text between the GENERATED markers, so
the package never reads YAML at run time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "src" / "moecl" / "data" / "templates.py"
BEGIN = "# BEGIN GENERATED (scripts/make_templates.py)\n"
END = "# END GENERATED\n"
# prompts.yaml section -> registry name
KEYS = {
    "Aircraft": "aircraft",
    "Caltech101": "caltech101",
    "CIFAR100": "cifar100",
    "DTD": "dtd",
    "EuroSAT": "eurosat",
    "Flowers": "flowers",
    "Food": "food",
    "MNIST": "mnist",
    "OxfordPet": "oxford_pet",
    "StanfordCars": "stanford_cars",
    "SUN397": "sun397",
    "CIFAR10": "cifar10",
}
# Standard class folder names, aligned with the hand-written lists, so that a subset of the classes (the bundled
# data) still gets the right names. Caltech101 / CIFAR-10 come from the data MANIFEST (sorted folders).
EUROSAT_FOLDERS = [
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
]


def _str_tuple_dict(name: str, annotation: str, data: dict[str, list[str]]) -> str:
    lines = [f"{name}: {annotation} = {{"]
    for key, values in data.items():
        lines.append(f"    {key!r}: (")
        lines += [f"        {v!r}," for v in values]
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines)


def _int_tuple_dict(name: str, data: dict[str, list[int]], per_line: int = 20) -> str:
    lines = [f"{name}: dict[str, tuple[int, ...]] = {{"]
    for key, values in data.items():
        lines.append(f"    {key!r}: (")
        for i in range(0, len(values), per_line):
            lines.append("        " + " ".join(f"{v}," for v in values[i : i + per_line]))
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines)


def generate(docs: Path, manifest: Path) -> str:
    prompts = yaml.safe_load((docs / "prompts.yaml").read_text(encoding="utf-8"))
    orders = yaml.safe_load((docs / "class_orders.yaml").read_text(encoding="utf-8"))
    data = json.loads(manifest.read_text(encoding="utf-8"))["datasets"]
    wnids = data["imagenet_sample"]["wnid_to_name"]
    folders = {"caltech101": data["caltech101"]["classes"], "eurosat": EUROSAT_FOLDERS, "cifar10": data["cifar10"]["classes"]}
    unknown = set(prompts) - set(KEYS)
    if unknown:
        raise SystemExit(f"prompts.yaml: sections without a registry name: {sorted(unknown)} (add them to KEYS)")
    templates = {KEYS[k]: [str(t) for t in v["templates"]] for k, v in prompts.items()}
    classnames = {KEYS[k]: [str(c) for c in v["classnames"]] for k, v in prompts.items() if "classnames" in v}
    for key, names in folders.items():
        if len(names) != len(classnames[key]):
            raise SystemExit(f"{key}: {len(names)} class folders but {len(classnames[key])} hand-written names")
    cil = {str(k): [int(i) for i in v] for k, v in orders.items()}
    for key, order in cil.items():
        if sorted(order) != list(range(len(order))):
            raise SystemExit(f"class_orders.yaml: {key} is not a permutation of 0..{len(order) - 1}")
    imagenet = "\n".join(
        ["IMAGENET_CLASSNAMES: dict[str, str] = {"] + [f"    {k!r}: {v!r}," for k, v in sorted(wnids.items())] + ["}"]
    )
    return "\n\n".join(
        [
            "# From prompts.yaml: templates per dataset (first = training prompt).\n"
            + _str_tuple_dict("TEMPLATES", "dict[str, tuple[str, ...]]", templates),
            "# From prompts.yaml: hand-written class names, in the dataset's label order.\n"
            + _str_tuple_dict("CLASSNAMES", "dict[str, tuple[str, ...]]", classnames),
            "# Standard class folder names aligned with CLASSNAMES (Caltech101 / CIFAR-10: MANIFEST; EuroSAT).\n"
            + _str_tuple_dict("CLASS_FOLDERS", "dict[str, tuple[str, ...]]", folders),
            "# From class_orders.yaml: CIL class orders, indices as the official code labels the classes (CIFAR-100 fine\n"
            "# labels; TinyImageNet: position in wnids.txt, see OFFICIAL_CLASS_INDEX below).\n"
            + _int_tuple_dict("CIL_CLASS_ORDERS", cil),
            "# From the data MANIFEST (imagenet_sample wnid_to_name): readable ImageNet-1k class names.\n" + imagenet,
        ]
    ) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=REPO.parent / "shared" / "docs")
    parser.add_argument("--manifest", type=Path, default=REPO.parent / "shared" / "data" / "MANIFEST.json")
    args = parser.parse_args()
    text = TARGET.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    TARGET.write_text(head + BEGIN + generate(args.docs, args.manifest) + END + tail, encoding="utf-8")
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
