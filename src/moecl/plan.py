"""What a run will cost, before it starts (`moecl plan`, `moecl train --dry-run`).

From the config and the dataset sizes alone: image decodes, training passes, evaluation forwards (with and without
reusing zero-shot embeddings), selector feature passes, peak host memory per process (by component) and checkpoint
disk,
so a user sees whether a run fits the machine before launching it. Nothing is loaded or downloaded: parameter counts
come from the model built on the meta device (params.py). Dataset sizes are the real split sizes when the stream's
data is present, else the official split sizes of the registry (data/registry.py `split_sizes`), and the plan says
which.

The counts follow the engine: a zero-shot row then one row per task (engine.Engine.run), each row evaluating every
test set (MTIL) or the steps learned so far (CIL, engine.Engine.evaluate); steps per task from engine.task_steps;
selector fits as methods/moe_adapters.py runs them, each selector kind's cost from its class (selector/base.py's
cost methods: DDAS's autoencoder schedules, the prototype selector's one pass over each task's images).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecl.batches import resolve_workers
from moecl.checkpoint import KEEP_CHECKPOINTS
from moecl.config import MIB, RunConfig, StreamConfig
from moecl.data import cil, mtil, registry
from moecl.data.folder import DataError
from moecl.data.tasks import build_stream, bundled_data_root, stream_data_root
from moecl.engine import task_steps
from moecl.moe.model import MoEAdapterModel
from moecl.params import meta_parts, parameter_counts
from moecl.selector.base import TaskSelector, selector_class
from moecl.selector.features import feature_dim
from moecl.selector.reference import reference_images

GiB = 1024 * MIB
FLOAT_BYTES = 4  # fp32 weights, features and embeddings
PIXEL_CHANNELS = 3  # an RGB uint8 crop: 3 x S x S bytes
ADAMW_STATES = 2  # exp_avg and exp_avg_sq per trainable parameter
# RSS after `import torch, transformers, moecl.engine`, measured on the 2-core CPU development machine (252 MiB),
# rounded up. A CUDA context adds ~1-3 GB more on GPU hosts: CUDA_CONTEXT_BYTES is the upper end, counted on cuda.
RUNTIME_BYTES = 256 * MIB
CUDA_CONTEXT_BYTES = 3 * GiB


@dataclass(frozen=True)
class MethodModel:
    """What a method trains and keeps, as far as cost goes (see each learner in methods/)."""

    adapters: bool = False  # MoE adapters (+ DDAS when the selector is on); else the backbone's towers train
    trains: bool = True  # zero_shot has nothing to train: the engine skips its steps
    batches_per_step: int = 1  # ZSCL draws a reference batch of the same size every step
    snapshots: int = 0  # in-memory copies of the trained towers (LwF: previous model; WiSE-FT/ZSCL: zero-shot)
    checkpoint_copies: int = 1  # copies of the trained towers per checkpoint (LwF also saves the previous model)


METHOD_MODELS: dict[str, MethodModel] = {
    "moe_adapters": MethodModel(adapters=True),
    "zero_shot": MethodModel(trains=False, checkpoint_copies=0),
    "finetune": MethodModel(),
    "lwf": MethodModel(snapshots=1, checkpoint_copies=2),
    "wise_ft": MethodModel(snapshots=1),
    "zscl": MethodModel(batches_per_step=2, snapshots=1),
}


# --------------------------------------------------------------------------------------------------------------
# Dataset sizes
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSize:
    name: str
    train: int
    test: int
    classes: int  # the task's classes (a selector keeping per-class statistics keeps one set each)


@dataclass(frozen=True)
class DataSizes:
    """Split sizes of the stream's tasks and the number of reference images the selector reads, with where they came
    from."""

    kind: str  # "mtil" | "cil"
    tasks: tuple[TaskSize, ...]
    source: str  # "real split sizes (...)" or "official split sizes (data not found under ...)"
    reference: int = 0  # reference images (after selector.reference_max_images); 0: no reference fit
    reference_source: str = ""  # "real split sizes" or "official split sizes, not found under ..."
    reference_name: str = ""  # selector.reference


def data_sizes(cfg: RunConfig, base: Path | None = None, stream: Any = None) -> DataSizes:
    """The sizes of `stream` (a built TaskStream), else of the stream cfg describes: built as `moecl train` builds
    it when all its datasets are present under its root, else the registry's official sizes."""
    root = stream_data_root(cfg.stream, base)
    names = () if stream is not None or cfg.stream.tasks else _stream_datasets(cfg.stream)
    missing = [name for name in names if registry.locate(name, root) is None]
    if missing:
        tasks = official_task_sizes(cfg.stream)
        source = f"official split sizes (data not found under {root}: {len(missing)} of {len(names)} datasets)"
    else:
        stream = stream if stream is not None else build_stream(cfg.stream, base_dir=base, seed=cfg.seed)
        tasks = tuple(TaskSize(t.name, len(t.train), len(t.test), len(t.classnames)) for t in stream.tasks)
        source = f"real split sizes (data under {root})" if not cfg.stream.tasks else "real split sizes"
    reference, reference_source = reference_size(cfg)
    name = cfg.selector.reference if selector_class(cfg.selector.kind).USES_REFERENCE else None
    return DataSizes(cfg.stream.kind, tasks, source, reference, reference_source, name or "")


def _stream_datasets(cfg: StreamConfig) -> tuple[str, ...]:
    return (cil.cil_dataset(cfg),) if cfg.class_incremental else mtil.mtil_datasets(cfg)


def _official(name: str, split: str) -> int:
    info = registry.get_dataset(name)
    if split not in info.split_sizes:
        raise DataError(
            f"{info.name}: no official size of its '{split}' split is recorded; put the data under the stream's root "
            "so `moecl plan` can count it"
        )
    return info.split_sizes[split]


def _capped(n: int, classes: int, *caps: int | None) -> int:
    """n images limited to k per class for every cap k given (few-shot shots, max_*_per_class)."""
    for k in caps:
        if k is not None:
            n = min(n, k * classes)
    return n


def official_task_sizes(cfg: StreamConfig) -> tuple[TaskSize, ...]:
    """Task sizes of the stream from the registry's official split sizes, with few-shot and per-class caps applied
    (k per class, assuming every class has k images); CIL steps get their share of the classes."""
    if cfg.tasks:
        raise DataError("a custom stream (stream.tasks) has no official sizes: its folders must exist to plan it")
    sizes = []
    for name in _stream_datasets(cfg):
        classes = registry.get_dataset(name).num_classes
        train = _capped(_official(name, "train"), classes, cfg.shots, cfg.max_train_per_class)
        test = _capped(_official(name, "test"), classes, cfg.max_test_per_class)
        if not cfg.class_incremental:
            sizes.append(TaskSize(name, train, test, classes))
            continue
        for k, (start, end) in enumerate(cil.step_bounds(classes, cfg.steps, cfg.base_classes)):
            share = (end - start) / classes  # the CIL datasets have the same number of images in every class
            sizes.append(TaskSize(cil.step_name(name, k), round(train * share), round(test * share), end - start))
    return tuple(sizes)


def reference_size(cfg: RunConfig) -> tuple[int, str]:
    """(reference images the selector reads, where the count comes from); (0, "") without a reference fit. Read as
    MoEAdaptersLearner.from_config reads them, else the registry's sizes of every split of the dataset."""
    sel = cfg.selector
    selector = selector_of(cfg)
    if selector is None or not selector.fits_reference(sel):
        return 0, ""
    root = stream_data_root(cfg.stream)
    if not Path(sel.reference).expanduser().exists():  # a registry dataset (else "unknown dataset", as a run says)
        info = registry.get_dataset(sel.reference)
        if registry.locate(info.name, root) is None and registry.locate(info.name, bundled_data_root()) is None:
            n = sum(_official(info.name, split) for split in (sel.reference_splits or info.splits))
            n = n if sel.reference_shots is None else min(n, sel.reference_shots * info.num_classes)
            n = n if sel.reference_max_images is None else min(n, sel.reference_max_images)
            return n, f"official split sizes, not found under {root}"
    return len(reference_images(sel, root, cfg.seed)), "real split sizes"


# --------------------------------------------------------------------------------------------------------------
# What the model holds
# --------------------------------------------------------------------------------------------------------------
def selector_of(cfg: RunConfig) -> type[TaskSelector] | None:
    """The class of the selector that routes the run's test images (selector.kind); None without one."""
    return selector_class(cfg.selector.kind) if cfg.uses_ddas else None


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts and widths the plan needs, from the meta-device model."""

    backbone: int  # frozen backbone parameters
    adapters: int  # MoE experts + routers of all tasks (0: the method trains the backbone's towers)
    selector: int  # selector parameters: DDAS autoencoders (tasks + reference); none for the prototype selector
    trainable: int  # the most parameters one task trains (AdamW state): the MoE count, or the trained towers
    snapshots: int  # parameters of in-memory copies of the trained towers
    checkpointed: int  # parameters in one checkpoint
    outputs: int  # parameters the run directory keeps (adapters/, selector/)
    selector_vectors: int  # feature-sized fp32 vectors the selector keeps outside its parameters (prototypes)
    feature_dim: int  # F: selector feature width
    embed_dim: int  # D: image embedding width
    cache_entry: int  # bytes of one frozen-prefix / decoded-image cache entry
    cache_entry_note: str
    cache_serves_pixels: bool  # the cache holds the image crop itself (so pixel features can use it too)


def model_size(cfg: RunConfig, sizes: DataSizes) -> ModelSize:
    parts = meta_parts(cfg, len(sizes.tasks))
    counts = parameter_counts(parts)
    backbone = parts.model.backbone if isinstance(parts.model, MoEAdapterModel) else parts.model
    method = METHOD_MODELS[cfg.method]
    selector = counts["selector"]
    if method.adapters:
        adapters, trainable, snapshots, kept = counts["moe"], counts["moe"], 0, counts["moe"] + selector
    else:
        tower = counts["trainable"]  # the backbone towers the baseline trains (none for zero_shot)
        adapters, trainable = 0, tower
        snapshots, kept = method.snapshots * tower, method.checkpoint_copies * tower
    entry, note, pixels = _cache_entry(cfg, backbone)
    kind = selector_of(cfg)
    vectors = kind.CLASS_VECTORS * sum(t.classes for t in sizes.tasks) if kind is not None else 0
    return ModelSize(
        backbone=counts["total"] - counts["moe"] - selector,
        adapters=adapters,
        selector=selector,
        trainable=trainable,
        snapshots=snapshots,
        checkpointed=kept,
        outputs=adapters + selector,
        selector_vectors=vectors,
        feature_dim=feature_dim(cfg.selector.features, backbone),
        embed_dim=int(backbone.embed_dim),
        cache_entry=entry,
        cache_entry_note=note,
        cache_serves_pixels=pixels,
    )


def _cache_entry(cfg: RunConfig, backbone: Any) -> tuple[int, str, bool]:
    """(bytes, description, holds the crop) of one cache entry. CLIP's first adapter is in block 0, so its frozen
    prefix is the image: the cache holds the uint8 crop. The lite backbone caches its fp32 prefix (the Lite0 blocks
    before the first site), whose shape a meta-device forward gives for free."""
    size = cfg.backbone.image_size
    crop = PIXEL_CHANNELS * size * size
    if cfg.backbone.name == "clip":
        return crop, f"uint8 {PIXEL_CHANNELS}x{size}x{size} crop", True
    try:
        prefix = backbone.image_prefix(torch.empty(1, PIXEL_CHANNELS, size, size, device="meta"))
    except (RuntimeError, NotImplementedError):  # a backbone whose prefix does not run on meta: assume the crop
        return crop, f"uint8 {PIXEL_CHANNELS}x{size}x{size} crop (prefix shape unknown)", True
    shape = "x".join(str(d) for d in prefix.shape[1:])
    return FLOAT_BYTES * prefix[0].numel(), f"fp32 {shape} prefix", False


def planned_device(spec: str) -> str:
    """The kind of device ("cpu" or "cuda") `device` gives; "auto" as it resolves on this machine (a GPU if any)."""
    if spec == "cpu":
        return "cpu"
    if spec.startswith("cuda"):
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Counts:
    """Images through each kind of pass over the whole run."""

    training_passes: int  # images through a training step
    eval_forwards: int  # test images through the model, every row
    eval_forwards_reuse: int  # the same with zero-shot embeddings reused for datasets not learned yet
    # the selector's feature passes (named when DDAS was the only selector): its reference fit, its task fits
    # (DDAS: autoencoder schedules and, with "auto", held-out calibration images; prototype: each train image once)
    # and the features of the evaluated test images of rows 1..T
    ddas_reference: int
    ddas_tasks: int
    ddas_eval: int
    decodes: int  # images decoded, no cache
    decodes_cached: int  # images decoded with the cache (estimate)
    cacheable: int  # distinct images the cache may hold
    cache_hit_share: float  # share of re-read cacheable images served by the cache

    @property
    def ddas_passes(self) -> int:
        return self.ddas_reference + self.ddas_tasks + self.ddas_eval


def evaluated_rows(class_incremental: bool, num_tasks: int) -> list[list[int]]:
    """Datasets each row evaluates: row 0 (zero-shot) every one; row r every one (MTIL) or the first r (CIL: the
    classes of later steps are not in the label space yet)."""
    every = list(range(num_tasks))
    return [every if not class_incremental or r == 0 else every[:r] for r in range(num_tasks + 1)]


def reuses_eval(cfg: RunConfig) -> bool:
    # (optim.eval_augment: another crop of each image in every row, nothing is kept by image key)
    return (
        cfg.data.reuse_eval and METHOD_MODELS[cfg.method].adapters and not cfg.stream.class_incremental
        and not cfg.optim.eval_augment
    )


def task_steps_of(cfg: RunConfig, sizes: DataSizes) -> tuple[int, ...]:
    trains = METHOD_MODELS[cfg.method].trains
    return tuple(task_steps(cfg, t.train) if trains else 0 for t in sizes.tasks)


def selector_fit_images(cfg: RunConfig, sizes: DataSizes) -> tuple[int, tuple[int, ...]]:
    """(reference fit images, per task fit images): what each selector fit reads (its class's task_reads and
    reference_reads)."""
    selector = selector_of(cfg)
    if selector is None:
        return 0, tuple(0 for _ in sizes.tasks)
    tasks = tuple(selector.task_reads(cfg.selector, t.train) for t in sizes.tasks)
    return selector.reference_reads(cfg.selector, sizes.reference), tasks


def augmented_fits(cfg: RunConfig) -> bool:
    selector = selector_of(cfg)
    return selector is not None and selector.augmented_fits(cfg.selector)


def count_passes(cfg: RunConfig, sizes: DataSizes, model: ModelSize) -> Counts:
    tests = [t.test for t in sizes.tasks]
    rows = evaluated_rows(cfg.stream.class_incremental, len(tests))
    steps = task_steps_of(cfg, sizes)
    training = sum(steps) * cfg.optim.batch_size * METHOD_MODELS[cfg.method].batches_per_step
    eval_forwards = sum(tests[j] for row in rows for j in row)
    reuse = eval_forwards
    if reuses_eval(cfg):  # rows r >= 1 forward only the datasets learned so far (j < r)
        reuse = sum(tests) + sum(tests[j] for r, row in enumerate(rows[1:], start=1) for j in row if j < r)
    ref_fit, task_fits = selector_fit_images(cfg, sizes)
    ddas_eval = sum(tests[j] for row in rows[1:] for j in row) if selector_of(cfg) is not None else 0
    cacheable = cacheable_images(cfg, sizes)
    # the share of cacheable images that fit the budget (LRU over a cyclic read order can hit less)
    budget = cache_budget(cfg)
    hit = min(1.0, budget / (cacheable * model.cache_entry)) if budget and cacheable else 0.0
    pixels_needed = selector_of(cfg) is not None and cfg.selector.features == "alexnet"
    if pixels_needed and not model.cache_serves_pixels:  # AlexNet reads pixels: a cached prefix does not serve it
        hit = 0.0
    # Evaluation: a row's batches carry what its forward and its selector features need, so one decode per image and
    # row; the first read of each test image is a miss, later rows hit with the share above.
    eval_cached = sum(tests) + (eval_forwards - sum(tests)) * (1 - hit)
    if cfg.optim.eval_augment:  # the training transform at evaluation: augmented reads are never cached
        eval_cached = eval_forwards
    # Task fits read train images un-augmented: cached already by training only when it is un-augmented too
    # (DDAS with selector.train_augment: every AE step decodes its batch).
    fresh = cfg.optim.train_augment or augmented_fits(cfg)
    fits_cached = sum(task_fits) * ((1 - hit) if not fresh else 1)
    return Counts(
        training_passes=training,
        eval_forwards=eval_forwards,
        eval_forwards_reuse=reuse,
        ddas_reference=ref_fit,
        ddas_tasks=sum(task_fits),
        ddas_eval=ddas_eval,
        decodes=training + eval_forwards + ref_fit + sum(task_fits),
        decodes_cached=round(training + eval_cached + ref_fit + fits_cached),
        cacheable=cacheable,
        cache_hit_share=hit,
    )


def cacheable_images(cfg: RunConfig, sizes: DataSizes) -> int:
    """Distinct images the cache may hold: test images, train images when training reads them un-augmented (else
    only those the task fits read), and the reference images of the reference fit."""
    ref_fit, task_fits = selector_fit_images(cfg, sizes)
    fresh = augmented_fits(cfg)  # augmented selector inputs are never cached
    fits = 0 if fresh else sum(min(f, t.train) for f, t in zip(task_fits, sizes.tasks, strict=True))
    train = sum(t.train for t in sizes.tasks) if not cfg.optim.train_augment else fits
    tests = 0 if cfg.optim.eval_augment else sum(t.test for t in sizes.tasks)
    return tests + train + (0 if fresh else ref_fit)


# --------------------------------------------------------------------------------------------------------------
# Memory and disk
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    name: str
    bytes: int
    note: str = ""


def cache_budget(cfg: RunConfig) -> int:
    return int(cfg.data.cache_mb * MIB) if cfg.backbone.cache_prefix else 0


def data_workers(cfg: RunConfig, device: str) -> int:
    return resolve_workers(cfg.data.workers, torch.device(device))


def negatives_kept(cfg: RunConfig, sizes: DataSizes, features: int) -> int:
    """Reference feature vectors kept as outlier-exposure negatives (selector.negatives "reference"): those the
    reference AE trained on, a sample of them within the selector's memory budget when they exceed it."""
    if selector_of(cfg) is None or cfg.selector.negatives != "reference":
        return 0
    ref_fit, _ = selector_fit_images(cfg, sizes)  # 0: a selector without a reference fit keeps none
    return min(ref_fit, int(cfg.selector.memory_mb * MIB) // (features * FLOAT_BYTES))


def memory_lines(cfg: RunConfig, sizes: DataSizes, model: ModelSize, device: str) -> list[Line]:
    """Peak host memory of one process, by component."""
    lines = [Line("runtime", RUNTIME_BYTES, "python + torch + transformers, measured on a CPU host")]
    if device == "cuda":
        lines.append(Line("CUDA context", CUDA_CONTEXT_BYTES, "~1-3 GB on GPU hosts, upper end"))
    lines.append(Line("backbone weights", model.backbone * FLOAT_BYTES, "loaded on the host first, also for cuda"))
    if device == "cpu":  # on cuda these live on the GPU
        if model.adapters or model.selector:
            lines.append(Line("adapters + selector", (model.adapters + model.selector) * FLOAT_BYTES, "on the cpu"))
        if model.snapshots:
            lines.append(Line("trained tower copies", model.snapshots * FLOAT_BYTES, "previous / zero-shot model"))
        lines.append(Line("AdamW state", ADAMW_STATES * model.trainable * FLOAT_BYTES, "2 x the trainable count"))
    cacheable = cacheable_images(cfg, sizes)
    cache = min(cache_budget(cfg), cacheable * model.cache_entry)
    note = f"{cacheable:,} images x {model.cache_entry_note}" + _capped_note(cache < cacheable * model.cache_entry)
    lines.append(Line("image/prefix cache", cache, note if cache_budget(cfg) else "off"))
    lines += _selector_lines(cfg, sizes, model, device)
    selector = selector_of(cfg)
    if reuses_eval(cfg):
        per_image = model.embed_dim * FLOAT_BYTES
        note = "zero-shot embedding"
        if selector is not None:
            per_image += (len(sizes.tasks) + 1) * FLOAT_BYTES
            note += f" + {selector.LABEL} errors"
            if cfg.selector.features != "alexnet":  # backbone features are embedding-sized: kept; AlexNet's are not
                per_image += model.feature_dim * FLOAT_BYTES
                note += f" + {selector.LABEL} features"
        tests = sum(t.test for t in sizes.tasks)
        lines.append(Line("evaluation reuse store", tests * per_image, f"{note} per image"))
    workers = data_workers(cfg, device)
    batch = max(cfg.optim.batch_size, cfg.optim.eval_batch_size)
    size = cfg.backbone.image_size
    buffers = (
        max(1, workers) * cfg.data.prefetch * batch * PIXEL_CHANNELS * size * size * (2 if device == "cuda" else 1)
    )
    who = _workers(workers) if workers else "in-process (0 workers)"
    note = f"{who}: {max(1, workers)} x {cfg.data.prefetch} batches of {batch}"
    lines.append(Line("data loader buffers", buffers, note + (", pinned copies" if device == "cuda" else "")))
    return lines


def _workers(n: int) -> str:
    return f"{n} data worker{'' if n == 1 else 's'}"


def _capped_note(capped: bool) -> str:
    return ", capped at the budget" if capped else ""


def _selector_lines(cfg: RunConfig, sizes: DataSizes, model: ModelSize, device: str) -> list[Line]:
    """The selector's own host memory: what its fits hold, the reference negatives, the statistics it keeps. What
    lives where the selector is (fit features, kept statistics) is on the GPU of a cuda run."""
    selector = selector_of(cfg)
    if selector is None:
        return []
    lines = [_fit_features_line(cfg, sizes, model, selector)] if selector.HOLDS_FIT_FEATURES and device == "cpu" else []
    if model.selector_vectors and device == "cpu":
        note = f"{model.selector_vectors:,} class prototypes x {model.feature_dim:,} fp32"
        lines.append(Line("selector prototypes", _vector_bytes(model), note))
    negatives = negatives_kept(cfg, sizes, model.feature_dim)
    if negatives:
        note = f"{negatives:,} reference feature vectors"
        lines.append(Line(f"{selector.LABEL} reference negatives", negatives * model.feature_dim * FLOAT_BYTES, note))
    return lines


def _vector_bytes(model: ModelSize) -> int:
    return model.selector_vectors * model.feature_dim * FLOAT_BYTES


def _fit_features_line(cfg: RunConfig, sizes: DataSizes, model: ModelSize, selector: type[TaskSelector]) -> Line:
    """The features the largest fit holds: read and prepared when they fit selector.memory_mb, else a chunk."""
    row = model.feature_dim * FLOAT_BYTES
    ref_fit, task_fits = selector_fit_images(cfg, sizes)
    budget = int(cfg.selector.memory_mb * MIB)
    chunk = max(cfg.selector.batch_size, cfg.optim.eval_batch_size)

    def held(images: int) -> bool:  # augmented fits read every step afresh: always streamed
        return images * row <= budget and not augmented_fits(cfg)

    def peak(images: int) -> int:  # held: the features read plus their prepared copy; streamed: a chunk of them
        return 2 * images * row if held(images) else 2 * chunk * row

    largest = max([ref_fit, *task_fits] if ref_fit else task_fits, key=peak)  # (no reference fit: not a candidate)
    if held(largest):
        note = f"{largest:,} x {model.feature_dim:,} fp32, held (x2 while prepared)"
    else:
        note = f"{largest:,} x {model.feature_dim:,} fp32 exceed selector.memory_mb: streamed, {chunk} rows at a time"
    return Line(f"{selector.LABEL} fit features", peak(largest), note)


def checkpoint_lines(cfg: RunConfig, sizes: DataSizes, model: ModelSize) -> list[Line]:
    """One checkpoint, by component (the largest: after the last task, or mid-task with optimizer state)."""
    what = "trained towers"
    if model.adapters:  # a selector keeping statistics instead of parameters (prototypes) has a line of its own
        what = "adapters + routers" if model.selector_vectors else "adapters + routers + selector AEs"
    lines = [Line("trained weights", model.checkpointed * FLOAT_BYTES, what)]
    if model.selector_vectors:
        lines.append(Line("selector prototypes", _vector_bytes(model), "saved with the selector"))
    negatives = negatives_kept(cfg, sizes, model.feature_dim)
    if negatives:
        lines.append(Line("selector negatives", negatives * model.feature_dim * FLOAT_BYTES, "saved with the selector"))
    if cfg.checkpoint_every > 0 and model.trainable:
        lines.append(Line("AdamW state", ADAMW_STATES * model.trainable * FLOAT_BYTES, "mid-task checkpoints"))
    return lines


def output_bytes(cfg: RunConfig, sizes: DataSizes, model: ModelSize) -> int:
    """The run directory's adapters/ and selector/ (one more copy of the trained adapters and selector)."""
    negatives = negatives_kept(cfg, sizes, model.feature_dim) * model.feature_dim
    return (model.outputs + negatives) * FLOAT_BYTES + _vector_bytes(model)


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A run's estimated cost (`estimate`); `to_dict` for --json, `format` for the table."""

    run: str  # what runs, one line
    device: str  # "cpu" | "cuda"
    workers: int
    sizes: DataSizes
    steps: tuple[int, ...]  # per task
    counts: Counts
    memory: tuple[Line, ...]
    checkpoint: tuple[Line, ...]  # one checkpoint
    kept: int  # checkpoints the store keeps
    outputs: int  # bytes of the run's outputs
    notes: tuple[str, ...]
    selector: type[TaskSelector] | None = None  # the selector that routes test images (names its rows)

    @property
    def peak_memory(self) -> int:
        return sum(line.bytes for line in self.memory)

    @property
    def checkpoint_bytes(self) -> int:
        return sum(line.bytes for line in self.checkpoint)

    @property
    def disk(self) -> int:
        return self.kept * self.checkpoint_bytes + self.outputs

    def to_dict(self) -> dict[str, Any]:
        def lines(items: tuple[Line, ...]) -> list[dict[str, Any]]:
            return [dataclasses.asdict(line) for line in items]

        return {
            "run": self.run,
            "device": self.device,
            "data_workers": self.workers,
            "sizes": {
                "source": self.sizes.source,
                "tasks": [  # (their classes stay out: the JSON of a plan keeps its layout)
                    {"name": t.name, "train": t.train, "test": t.test, "steps": s}
                    for t, s in zip(self.sizes.tasks, self.steps, strict=True)
                ],
                "reference_images": self.sizes.reference,
                "reference_source": self.sizes.reference_source,
                "reference": self.sizes.reference_name or None,
            },
            "counts": {**dataclasses.asdict(self.counts), "ddas_passes": self.counts.ddas_passes},
            "memory": {"components": lines(self.memory), "peak_bytes": self.peak_memory},
            "disk": {
                "checkpoint": lines(self.checkpoint),
                "checkpoint_bytes": self.checkpoint_bytes,
                "checkpoints_kept": self.kept,
                "outputs_bytes": self.outputs,
                "total_bytes": self.disk,
            },
            "notes": list(self.notes),
        }

    def format(self) -> str:
        return "\n".join(_format(self))


def estimate(cfg: RunConfig, sizes: DataSizes) -> Plan:
    """The cost of running `cfg` over tasks of `sizes` (see the module docstring)."""
    device = planned_device(cfg.device)
    model = model_size(cfg, sizes)
    counts = count_passes(cfg, sizes, model)
    return Plan(
        run=_describe(cfg, sizes, device),
        device=device,
        workers=data_workers(cfg, device),
        sizes=sizes,
        steps=task_steps_of(cfg, sizes),
        counts=counts,
        memory=tuple(memory_lines(cfg, sizes, model, device)),
        checkpoint=tuple(checkpoint_lines(cfg, sizes, model)),
        kept=KEEP_CHECKPOINTS,
        outputs=output_bytes(cfg, sizes, model),
        notes=tuple(_notes(cfg, sizes, device)),
        selector=selector_of(cfg),
    )


def plan_run(cfg: RunConfig, base: Path | None = None, stream: Any = None) -> Plan:
    """`estimate` over the sizes of the stream cfg describes (or of `stream`, already built)."""
    return estimate(cfg, data_sizes(cfg, base, stream))


def _describe(cfg: RunConfig, sizes: DataSizes, device: str) -> str:
    b = cfg.backbone
    backbone = f"{b.name} {b.model} {b.image_size}px" if b.name == "clip" else f"{b.name} {b.image_size}px"
    where = f"{cfg.device} -> {device} on this machine" if cfg.device == "auto" else cfg.device
    return (
        f"{cfg.method} on {cfg.stream.name} ({len(sizes.tasks)} tasks, {sizes.kind}), backbone {backbone}, "
        f"device {where}"
    )


def _notes(cfg: RunConfig, sizes: DataSizes, device: str) -> list[str]:
    notes = []
    selector = selector_of(cfg)
    if reuses_eval(cfg) and selector is not None:
        notes.append(
            f"evaluation with reuse is an upper bound on the saving: it assumes {selector.NAME} sends every image of "
            "a dataset not learned yet to zero-shot"
        )
    if selector is not None:
        notes.append(f"{selector.NAME} evaluation features read the evaluation batches: no decodes of their own")
    notes.append("image decodes count every training batch (no cache), the upper bound")
    if cfg.data.workers == "auto":
        notes.append(
            f"data.workers auto resolved on this machine ({_cores()} cores) for {device}; a host with "
            "other cores gets another count"
        )
    if device == "cpu":
        notes.append("planned for the cpu: pass --device cuda to plan a GPU run (CUDA context, pinned buffers)")
        # Measured on the quickstart (this 2-core CPU): peak RSS 1.24 GiB against 0.51 GiB planned, the rest mostly
        # the transient activations of the feature passes at optim.eval_batch_size.
        notes.append(
            "not counted: activations of the forward and backward passes, host memory too on the cpu, which can "
            "exceed the rest (they scale with optim.batch_size and optim.eval_batch_size)"
        )
    if not METHOD_MODELS[cfg.method].adapters:
        notes.append(f"{cfg.method}: the trained towers live in the backbone weights; AdamW state counts them")
    return notes


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------------------
# Readable output
# --------------------------------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def human_count(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{round(n):,}"


def _row(name: str, value: str, note: str = "") -> str:
    return f"  {name:<28} {value:>12}  {note}".rstrip()


def _format(plan: Plan) -> list[str]:
    out = [f"plan: {plan.run}"] + _format_sizes(plan) + _format_counts(plan)
    out.append(f"peak host memory per process ({plan.device}, {_workers(plan.workers)})")
    out += [_row(line.name, human_bytes(line.bytes), line.note) for line in plan.memory]
    out.append(_row("peak (sum)", human_bytes(plan.peak_memory)))
    out.append("checkpoint disk")
    out += [_row(line.name, human_bytes(line.bytes), line.note) for line in plan.checkpoint]
    out.append(_row("per checkpoint", human_bytes(plan.checkpoint_bytes)))
    out.append(_row(f"kept checkpoints ({plan.kept})", human_bytes(plan.kept * plan.checkpoint_bytes)))
    out.append(_row("run outputs", human_bytes(plan.outputs), "adapters/ + selector/"))
    out.append(_row("total", human_bytes(plan.disk)))
    return out + [f"note: {n}" for n in plan.notes]


def _format_sizes(plan: Plan) -> list[str]:
    sizes = plan.sizes
    out = [f"sizes: {sizes.source}"]
    if sizes.reference:
        out.append(f"reference: {sizes.reference_name}, {sizes.reference:,} images ({sizes.reference_source})")
    out.append(f"  {'task':<20} {'train':>10} {'test':>10} {'steps':>8}")
    for t, s in zip(sizes.tasks, plan.steps, strict=True):
        out.append(f"  {t.name:<20} {t.train:>10,} {t.test:>10,} {s:>8,}")
    total_train, total_test = sum(t.train for t in sizes.tasks), sum(t.test for t in sizes.tasks)
    return out + [f"  {'total':<20} {total_train:>10,} {total_test:>10,} {sum(plan.steps):>8,}"]


def _format_counts(plan: Plan) -> list[str]:
    c = plan.counts
    out = ["images through"]
    out.append(_row("training passes", human_count(c.training_passes)))
    out.append(_row("evaluation forwards", human_count(c.eval_forwards), "no reuse"))
    out.append(_row("", human_count(c.eval_forwards_reuse), "with reuse of zero-shot embeddings"))
    if plan.selector is not None and c.ddas_passes:
        reference = f"reference {human_count(c.ddas_reference)}, " if plan.selector.USES_REFERENCE else ""
        parts = f"{reference}tasks {human_count(c.ddas_tasks)}, eval {human_count(c.ddas_eval)}"
        out.append(_row(f"{plan.selector.LABEL} feature passes", human_count(c.ddas_passes), parts))
    out.append(_row("image decodes", human_count(c.decodes), "no cache"))
    share = f"with the cache (holds {c.cache_hit_share:.0%} of {human_count(c.cacheable)} images)"
    return out + [_row("", human_count(c.decodes_cached), share)]
