"""Inference from a finished run: DDAS picks the task of every image, or the zero-shot branch.

`Predictor.from_run(run_dir, cfg)` rebuilds the frozen backbone from the run's config, loads the saved adapters,
routers and selector onto it (adapters are portable across fresh loads of the same architecture), and classifies
images. Images routed to the same task share one forward (`predict` groups them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from moecl.branches import ZERO_SHOT
from moecl.config import RunConfig
from moecl.data.folder import is_image_name
from moecl.progress import bar as progress_bar


@dataclass(frozen=True)
class TaskInfo:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


def save_stream_info(path: Path, tasks: Sequence[TaskInfo]) -> None:
    from moecl.checkpoint import atomic_write_json

    atomic_write_json(
        path, [{"name": t.name, "classnames": list(t.classnames), "templates": list(t.templates)} for t in tasks]
    )


def load_stream_info(path: Path) -> list[TaskInfo]:
    data = json.loads(path.read_text())
    return [TaskInfo(d["name"], tuple(d["classnames"]), tuple(d["templates"])) for d in data]


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded (sorted, recursive) to their image files: the names training reads too."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and is_image_name(q.name)))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    if not out:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}")
    return out


class Predictor:
    """Classifies images with automatic task selection (or an explicit task), using the run's own learner: its
    `route` (DDAS) picks the task of every image, its classifiers label it."""

    def __init__(self, learner, tasks: Sequence[TaskInfo], batch_size: int = 32):
        self.learner = learner.eval()
        self.model = learner.model
        self.tasks = list(tasks)
        self.batch_size = batch_size

    @classmethod
    def from_run(cls, run: Path, cfg: RunConfig, device: str | torch.device | None = None) -> Predictor:
        """The finished run in `run` on `device` (default: the run config's device setting, "auto")."""
        from moecl.backbone import build_backbone
        from moecl.device import Placement
        from moecl.methods.moe_adapters import MoEAdaptersLearner

        if cfg.method != "moe_adapters":
            raise ValueError(f"predict needs a moe_adapters run; {run} was trained with '{cfg.method}'")
        for needed in ("adapters", "stream.json"):
            if not (run / needed).exists():
                raise FileNotFoundError(f"{run / needed} is missing: was the run finished with this version?")
        placement = Placement.of(device if device is not None else cfg.device)
        learner = MoEAdaptersLearner.from_outputs(run, cfg, build_backbone(cfg.backbone)).place(placement)
        return cls(learner, load_stream_info(run / "stream.json"), cfg.optim.eval_batch_size)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, device: str | torch.device | None = None, revision: str | None = None
    ) -> Predictor:
        """A folder written by `moecl export`, or a Hugging Face Hub repo id holding one (downloaded with
        huggingface_hub.snapshot_download at `revision`). The backbone is rebuilt from the saved config."""
        from moecl.export import CONFIG_FILE

        path = Path(source)
        if not path.exists():
            if isinstance(source, Path) or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
                raise FileNotFoundError(f"{source}: no such folder (a hub id looks like 'owner/name')")
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=str(source), revision=revision))
        config = path / CONFIG_FILE
        if not config.is_file():
            raise FileNotFoundError(f"{config} is missing: not a folder written by `moecl export`")
        cfg = RunConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
        return cls.from_run(path, cfg, device)

    @property
    def selector(self):
        return self.learner.selector

    # ----------------------------------------------------------------------------------------------------------
    def _classifier(self, route: int) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """(class embeddings, [(task index, class name)]) for a route: a task's own classes, or for the zero-shot
        branch the union of all learned tasks' classes."""
        tasks = range(len(self.tasks)) if route == ZERO_SHOT else [route]
        labels = [(t, c) for t in tasks for c in self.tasks[t].classnames]
        parts = [
            self.learner.eval_classifier(
                self.tasks[t].classnames, self.tasks[t].templates, ("task", t), None if route == ZERO_SHOT else route
            )
            for t in tasks
        ]
        return torch.cat(parts), labels

    def task_index(self, name: str) -> int:
        names = [t.name for t in self.tasks]
        if name not in names:
            raise ValueError(f"unknown task '{name}' (this run learned: {', '.join(names)})")
        return names.index(name)

    def predict(self, images: Sequence[Image.Image], task: str | int | None = None) -> list[dict]:
        """-> one {"task", "label", "score"} per image; task=None lets the selector choose per image."""
        transform = self.model.image_transform(False)
        return self.predict_pixels(torch.stack([transform(img) for img in images]), task)

    @torch.no_grad()
    def predict_pixels(self, pixels: torch.Tensor, task: str | int | None = None) -> list[dict]:
        """`predict` on eval-transformed host pixels (B, 3, H, W)."""
        from moecl.batches import Batch, frozen_prefix

        learner = self.learner
        pixels = learner.placement.put(pixels)
        images = range(len(pixels))
        batch = Batch([str(n) for n in images], torch.zeros(len(pixels), dtype=torch.long, device=learner.device))
        batch.prefix = frozen_prefix(self.model.image_prefix, pixels)  # as the engine's batches carry it
        batch.pixels = pixels if learner.eval_needs_pixels() else None
        if task is not None:
            t = self.task_index(task) if isinstance(task, str) else int(task)
            routed = torch.full((len(images),), t, dtype=torch.long, device=learner.device)
        else:
            routed = learner.route(batch, learned=len(self.tasks))  # no selector: zero-shot
        # one forward for the whole batch: each row goes through its own task's router (-1: untouched)
        embeddings = self.model.image_suffix(batch.prefix, task=routed)
        out: list[dict] = [{}] * len(images)
        for r in routed.unique().tolist():
            rows = (routed == r).nonzero().flatten()
            classifier, labels = self._classifier(r)
            probs = (self.model.logit_scale * embeddings[rows] @ classifier.t()).softmax(-1)
            score, best = probs.max(-1)
            for row, s, b in zip(rows.tolist(), score.tolist(), best.tolist(), strict=True):
                t, label = labels[b]
                out[row] = {"task": None if r == ZERO_SHOT else self.tasks[t].name, "label": label, "score": s}
        return out

    def predict_paths(self, paths: Sequence[Path], task: str | None = None, progress: bool = True) -> list[dict]:
        results = []
        bar = progress_bar(len(paths), "predict", disable=not progress or len(paths) < 2)
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start : start + self.batch_size]
            images = []
            for p in chunk:
                try:
                    with Image.open(p) as im:
                        images.append(im.convert("RGB"))
                except (UnidentifiedImageError, OSError) as exc:
                    raise ValueError(f"cannot read image {p}: {exc}") from exc
            for p, r in zip(chunk, self.predict(images, task=task), strict=True):
                results.append({"image": str(p), **r})
            bar.update(len(chunk))
        bar.close()
        return results
