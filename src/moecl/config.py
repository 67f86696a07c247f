"""Frozen dataclass configs that validate themselves. The CLI turns YAML/argv into plain dicts; `RunConfig.from_dict`
builds them here, and so does any library caller: the rules below are the only ones (one home).

Every field has the paper's value (method.md) as its default where the paper fixes one, so a config file only
states what differs. Each dataclass checks itself in `__post_init__` (also when built directly or through
`dataclasses.replace`): the type of every field (enums are `Literal`s), then its value ranges and cross-field rules
(`_rules`). Errors are one line naming the key; unknown keys and enum values get a "did you mean" hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Literal, Union


class ConfigError(ValueError):
    """A config value or key is wrong; the message is meant for the user as-is."""


MIB = 1 << 20  # the unit of the *_mb memory settings
DEVICE_FORMAT = re.compile(r"auto|cpu|cuda(:\d+)?")  # RunConfig.device; availability: moecl.device.resolve_device

# The enums of the config (the names their code looks up: moecl.methods.METHODS, moecl.backbone.BACKBONES, ...).
ProtocolName = Literal["moecl", "paper"]  # RunConfig.protocol (moecl.protocol)
MethodName = Literal["moe_adapters", "zero_shot", "finetune", "lwf", "wise_ft", "zscl"]
BackboneName = Literal["clip", "lite"]
Tower = Literal["image", "text"]
Features = Literal["backbone", "alexnet"]  # DDAS features (moecl.selector.features)
Precision = Literal["fp32", "bf16", "fp16"]
Decision = Literal["image", "batch"]  # SelectorConfig.decision (moecl.selector.base)
SelectorKind = Literal["ddas", "prototype"]  # SelectorConfig.kind (moecl.selector.base.SELECTORS)
AgnosticClasses = Literal["routed", "union"]  # SelectorConfig.agnostic_classes (moecl.methods.moe_adapters)
StreamKind = Literal["mtil", "cil"]
OnBadImage = Literal["error", "skip"]
Tracker = Literal["jsonl", "csv", "tensorboard", "wandb"]
WandbMode = Literal["offline", "online"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)  # LoggingConfig.backends
WANDB_MODES: tuple[str, ...] = typing.get_args(WandbMode)

Rule = tuple[str, Any, bool, str]  # (field, its value, whether it is allowed, what it must be)


class Validated:
    """Base of the config dataclasses: `__post_init__` checks (and normalises: int -> float, list -> tuple) every
    field against its type hint, then the value rules of `_rules`. SECTION prefixes the keys in messages."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name, tp in _field_types(type(self)).items():
            value = _coerce(tp, getattr(self, name), self._key(name))
            object.__setattr__(self, name, value)  # frozen: the normalised value replaces the given one
        for name, value, ok, want in self._rules():
            if not ok:
                raise ConfigError(f"{self._key(name)}: {value!r} is not allowed; it must be {want}")

    def _rules(self) -> list[Rule]:
        return []

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}" if self.SECTION else name


@cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _at_least(low: float, value: float | None, optional: bool = False) -> bool:
    return (optional and value is None) or (value is not None and value >= low)


@dataclass(frozen=True)
class BackboneConfig(Validated):
    SECTION: ClassVar[str] = "backbone"
    name: BackboneName = "clip"  # "clip" (HF CLIPModel) or "lite" (EfficientNet-Lite0 + MiniLM, offline)
    model: str = "openai/clip-vit-base-patch16"  # hub id or local directory (clip)
    image_size: int = 224
    lite_image_blocks: int = 3  # lite: number of last EfficientNet blocks that get MoE sites (upper bound: lite.py)
    cache_prefix: bool = True  # reuse frozen-prefix outputs (layers before the first MoE site)

    def _rules(self) -> list[Rule]:
        return [
            ("image_size", self.image_size, _at_least(1, self.image_size), ">= 1"),
            ("lite_image_blocks", self.lite_image_blocks, _at_least(1, self.lite_image_blocks), ">= 1"),
        ]


@dataclass(frozen=True)
class MoEConfig(Validated):
    SECTION: ClassVar[str] = "moe"
    num_experts: int = 22
    top_k: int = 2
    bottleneck: int = 64
    scale: float = 0.1  # expert output multiplier
    dropout: float = 0.1
    towers: tuple[Tower, ...] = ("image", "text")
    layers: tuple[int, ...] | None = None  # None = every block of each tower (range checks need the backbone)
    noisy_gating: bool = True  # noise applies in training mode (and at evaluation with eval_noise)
    eval_noise: bool = False  # router noise also at evaluation (the official CIL code's; protocol "paper", CIL)
    freeze_per_task: int = 2  # activate-freeze: most-used experts frozen per block after each task (0 = off)
    load_balance_weight: float = 0.0  # reference computes and discards it: 0 is faithful
    single_router: bool = False  # CIL: one router for all steps

    def _rules(self) -> list[Rule]:
        n = self.num_experts
        return [
            ("num_experts", n, _at_least(1, n), ">= 1"),
            ("top_k", self.top_k, 1 <= self.top_k <= n, f"between 1 and moe.num_experts ({n})"),
            ("bottleneck", self.bottleneck, _at_least(1, self.bottleneck), ">= 1"),
            ("dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)"),
            ("towers", list(self.towers), len(self.towers) > 0, "at least one of image, text"),
            ("freeze_per_task", self.freeze_per_task, _at_least(0, self.freeze_per_task), ">= 0 (0: no freezing)"),
            ("load_balance_weight", self.load_balance_weight, self.load_balance_weight >= 0, ">= 0"),
        ]


@dataclass(frozen=True)
class SelectorConfig(Validated):
    SECTION: ClassVar[str] = "selector"
    enabled: bool = True
    # "ddas": the paper's autoencoders (selector/ddas.py); "prototype": class prototypes of the backbone's own
    # features with a per-task threshold calibrated on held-out images (selector/prototype.py)
    kind: SelectorKind = "ddas"
    features: Features = "backbone"  # "backbone" (frozen image embedding of the run's backbone), "alexnet" (paper)
    hidden: int = 100
    iterations: int = 300
    reference_iterations: int = 1000
    batch_size: int = 64
    lr: float = 0.01  # 0.003 few-shot
    weight_decay: float = 1e-4
    lr_step_epochs: int = 10
    threshold: float | Literal["auto"] = "auto"  # a number (paper: 0.0655 full-shot, 0.06 few-shot) or "auto"
    auto_quantile: float = 0.99  # "auto": this quantile of held-out in-distribution errors of each task
    auto_margin: float = 1.0  # "auto": threshold = auto_margin * that quantile
    heldout_fraction: float = 0.2  # "auto": share of each task's features held out of AE training for calibration
    # Outlier exposure: "reference" also trains each task AE to NOT explain the reference images better than the
    # reference AE does (hinge on e_t(r) / e_ref(r) >= 1, weight negative_weight); None = the paper's plain MSE AE.
    negatives: Literal["reference"] | None = None
    negative_weight: float = 0.2
    reference: str | None = "imagenet_sample"  # reference data: dataset name or folder/zip path; None = no ref AE
    reference_max_images: int | None = None
    reference_shots: int | None = None  # k reference images per class (official few-shot: 5), None = all
    reference_splits: tuple[str, ...] | None = None  # reference splits read (official: ("train",)), None = every one
    # How a test batch is routed: "image" (each image on its own errors) or "batch" (the official code's: one branch
    # for the whole evaluation batch of optim.eval_batch_size images, from their mean errors).
    decision: Decision = "image"
    # Autoencoders of tasks not learned yet (their seeded initial weights) also take part in the argmin, winning
    # images go to that task's untrained router (the official code's); needs a numeric threshold.
    untrained_in_argmin: bool = False
    # Autoencoder training inputs: the training transform, drawn afresh for every AE step (the official code's),
    # instead of the eval transform.
    train_augment: bool = False
    # Features held in memory for one autoencoder fit (MiB). A fit needs the features of at most iterations x
    # batch_size distinct images; when they do not fit, they are streamed through the data loader instead
    # (recomputed each epoch) and held-out scores are computed in chunks.
    memory_mb: float = 1024.0
    # "prototype": threshold_t = this quantile of the held-out images' distances to task t's nearest prototype
    prototype_quantile: float = 0.95
    # Task-agnostic evaluation (MTIL, union label space): "routed" classifies an image the selector sends to task t
    # among task t's classes (the selector's task decision is part of the prediction; zero-shot-routed images among
    # the whole union); "union" among every class of the union, whatever the route.
    agnostic_classes: AgnosticClasses = "routed"

    def _rules(self) -> list[Rule]:
        t = self.threshold
        prototype = self.kind == "prototype"
        return [
            ("hidden", self.hidden, _at_least(1, self.hidden), ">= 1"),
            ("iterations", self.iterations, _at_least(0, self.iterations), ">= 0"),
            ("reference_iterations", self.reference_iterations, _at_least(0, self.reference_iterations), ">= 0"),
            ("batch_size", self.batch_size, _at_least(1, self.batch_size), ">= 1"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("lr_step_epochs", self.lr_step_epochs, _at_least(1, self.lr_step_epochs), ">= 1"),
            ("threshold", t, t == "auto" or t >= 0, "a number >= 0 or 'auto'"),
            ("auto_quantile", self.auto_quantile, 0 < self.auto_quantile <= 1, "in (0, 1]"),
            ("auto_margin", self.auto_margin, self.auto_margin > 0, "> 0"),
            ("heldout_fraction", self.heldout_fraction, 0 < self.heldout_fraction < 1, "in (0, 1)"),
            (
                "negatives",
                self.negatives,
                self.negatives is None or self.reference is not None,
                "null when selector.reference is null ('reference' needs selector.reference, the reference images)",
            ),
            ("negative_weight", self.negative_weight, self.negative_weight >= 0, ">= 0"),
            ("reference_max_images", self.reference_max_images, _at_least(1, self.reference_max_images, True), ">= 1"),
            ("reference_shots", self.reference_shots, _at_least(1, self.reference_shots, True), ">= 1 or null (every image)"),
            (
                "untrained_in_argmin",
                self.untrained_in_argmin,
                not (self.untrained_in_argmin and t == "auto"),
                "false unless selector.threshold is a number (untrained autoencoders have no calibrated threshold; protocol "
                "'paper' turns it on: give the paper's selector.threshold, 0.0655 full-shot or 0.06 few-shot)",
            ),
            ("memory_mb", self.memory_mb, self.memory_mb >= 0, ">= 0 (0: always stream)"),
            ("prototype_quantile", self.prototype_quantile, 0 < self.prototype_quantile <= 1, "in (0, 1]"),
            (
                "features",
                self.features,
                not prototype or self.features == "backbone",
                "'backbone' with selector.kind 'prototype' (its prototypes are of the backbone's own features)",
            ),
            (
                "threshold",
                t,
                not prototype or t == "auto",
                "'auto' with selector.kind 'prototype' (its thresholds are calibrated on held-out images; "
                "selector.prototype_quantile sets them)",
            ),
        ]


@dataclass(frozen=True)
class OptimConfig(Validated):
    SECTION: ClassVar[str] = "optim"
    iterations: int = 1000  # per task (MTIL); ignored when epochs is set
    epochs: int | None = None  # CIL: epochs per step
    batch_size: int = 64
    lr: float = 1e-3
    lr_per_task: Mapping[str, float] = field(default_factory=dict)  # dataset name -> lr (the LR belongs to the dataset)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    label_smoothing: float = 0.2
    eval_batch_size: int = 128
    train_augment: bool = True  # RandomResizedCrop(scale 0.9-1.0); off makes frozen-prefix caching exact
    eval_augment: bool = False  # evaluate with the training transform (the official CIL code's; protocol "paper")
    precision: Precision = "fp32"  # training autocast: "fp32" (paper), "bf16" or "fp16" (fp16 with loss scaling on GPU)
    compile: bool = False  # torch.compile the model's blocks (opt-in; first steps are slower while compiling)

    def _rules(self) -> list[Rule]:
        return [
            ("iterations", self.iterations, _at_least(0, self.iterations), ">= 0"),
            ("epochs", self.epochs, _at_least(1, self.epochs, optional=True), ">= 1 or null"),
            ("batch_size", self.batch_size, _at_least(1, self.batch_size), ">= 1"),
            ("eval_batch_size", self.eval_batch_size, _at_least(1, self.eval_batch_size), ">= 1"),
            ("lr", self.lr, self.lr >= 0, ">= 0"),
            ("lr_per_task", dict(self.lr_per_task), all(v >= 0 for v in self.lr_per_task.values()), "learning rates >= 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("betas", self.betas, all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
            ("warmup_steps", self.warmup_steps, _at_least(0, self.warmup_steps), ">= 0"),
            ("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
        ]


@dataclass(frozen=True)
class CustomTaskConfig(Validated):
    SECTION: ClassVar[str] = "stream.tasks"
    name: str
    path: str
    train_split: str = "train"
    test_split: str = "test"
    classnames: Mapping[str, str] | None = None
    templates: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StreamConfig(Validated):
    SECTION: ClassVar[str] = "stream"
    name: str = "quickstart"  # mtil, cifar100, tinyimagenet, quickstart, or any name for a custom stream
    kind: StreamKind = "mtil"  # "mtil" (task-incremental, multi-domain) or "cil" (class-incremental)
    order: str = "I"  # MTIL order I / II (checked by moecl.data.mtil, case-insensitively)
    datasets: tuple[str, ...] | None = None  # explicit dataset order; default from name/order
    shots: int | None = None  # k images per class (few-shot); None = full
    steps: int = 10  # CIL: number of incremental steps
    base_classes: int = 0  # CIL: classes in the first step (TinyImageNet: 100)
    root: str | None = None  # dataset root; None = ../shared/data if present, else the in-repo subset
    max_train_per_class: int | None = None
    max_test_per_class: int | None = None
    tasks: tuple[CustomTaskConfig, ...] = ()  # custom stream from folders/zips
    on_bad_image: OnBadImage = "error"  # "error" or "skip"

    @property
    def class_incremental(self) -> bool:
        return self.kind == "cil"

    def _rules(self) -> list[Rule]:
        return [
            ("shots", self.shots, _at_least(1, self.shots, optional=True), ">= 1 or null (full data)"),
            ("steps", self.steps, _at_least(1, self.steps), ">= 1"),
            ("base_classes", self.base_classes, _at_least(0, self.base_classes), ">= 0"),
            ("max_train_per_class", self.max_train_per_class, _at_least(1, self.max_train_per_class, True), ">= 1"),
            ("max_test_per_class", self.max_test_per_class, _at_least(1, self.max_test_per_class, True), ">= 1"),
        ]


@dataclass(frozen=True)
class DataConfig(Validated):
    """How images reach the model: never what the results are (a resumed run may use other values)."""

    SECTION: ClassVar[str] = "data"
    workers: int | Literal["auto"] = "auto"  # DataLoader worker processes: "auto" (a share of the cores), 0 = in-process
    prefetch: int = 2  # batches each worker prepares ahead
    # Host memory for cached frozen prefixes / decoded images (MiB; 0 = none). Entries past the budget are simply
    # not cached: results are identical with any budget (tested), only decoding is repeated.
    cache_mb: float = 2048.0
    # Evaluation reuses what cannot change between rows: zero-shot embeddings and DDAS errors under finished
    # autoencoders (off: recomputed every row, for checking; the results are identical).
    reuse_eval: bool = True

    def _rules(self) -> list[Rule]:
        w = self.workers
        return [
            ("workers", w, w == "auto" or w >= 0, "an integer >= 0 or 'auto'"),
            ("prefetch", self.prefetch, _at_least(1, self.prefetch), ">= 1"),
            ("cache_mb", self.cache_mb, self.cache_mb >= 0, ">= 0 (0: no cache)"),
        ]


@dataclass(frozen=True)
class LoggingConfig(Validated):
    """Experiment tracking (moecl.tracking). log.jsonl is always written; the other backends are added to it."""

    SECTION: ClassVar[str] = "logging"
    backends: tuple[Tracker, ...] = ("jsonl",)  # any of TRACKERS; tensorboard and wandb need their optional extras
    every: int = 10  # optimiser steps between two logged training steps (loss, LR)
    wandb_project: str = "moecl"
    wandb_mode: WandbMode = "offline"  # offline needs no network or account; `wandb sync` uploads the run later

    def _rules(self) -> list[Rule]:
        b = list(self.backends)
        return [
            ("backends", b, len(set(b)) == len(b), "a list without repeats (a backend is named twice)"),
            ("every", self.every, _at_least(1, self.every), ">= 1"),
        ]


@dataclass(frozen=True)
class MethodConfig(Validated):
    SECTION: ClassVar[str] = "baselines"
    lwf_temperature: float = 2.0
    lwf_weight: float = 1.0
    wise_alpha: float = 0.5  # weight of the fine-tuned model in the weight-space ensemble
    zscl_weight: float = 1.0
    zscl_temperature: float = 2.0
    zscl_reference: str = "imagenet_sample"
    finetune_text: bool = False

    def _rules(self) -> list[Rule]:
        return [
            ("lwf_temperature", self.lwf_temperature, self.lwf_temperature > 0, "> 0"),
            ("lwf_weight", self.lwf_weight, self.lwf_weight >= 0, ">= 0"),
            ("wise_alpha", self.wise_alpha, 0 <= self.wise_alpha <= 1, "in [0, 1]"),
            ("zscl_weight", self.zscl_weight, self.zscl_weight >= 0, ">= 0"),
            ("zscl_temperature", self.zscl_temperature, self.zscl_temperature > 0, "> 0"),
        ]


@dataclass(frozen=True)
class RunConfig(Validated):
    # "moecl" (our defaults) or "paper": the official code's protocol, expanded by `from_dict` into the explicit
    # fields that moecl.protocol.paper_settings names, and checked here (docs/reproduce.md)
    protocol: ProtocolName = "moecl"
    method: MethodName = "moe_adapters"
    seed: int = 42
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    baselines: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    device: str = "auto"  # "auto" (the first CUDA device when there is one), "cpu", "cuda", "cuda:N"
    checkpoint_every: int = 0  # steps between mid-task checkpoints (0 = only after each task)
    deterministic: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        from moecl.protocol import check_protocol

        check_protocol(self)

    def _rules(self) -> list[Rule]:
        return [
            ("device", self.device, DEVICE_FORMAT.fullmatch(self.device) is not None, "auto, cpu, cuda or cuda:N"),
            ("checkpoint_every", self.checkpoint_every, _at_least(0, self.checkpoint_every), ">= 0 (0: after each task only)"),
            ("threads", self.threads, _at_least(1, self.threads, optional=True), ">= 1 or null"),
        ]

    @property
    def uses_adapters(self) -> bool:
        """MoE adapters train (MoE-Adapters); every other method trains backbone towers, or nothing."""
        return self.method == "moe_adapters"

    @property
    def uses_ddas(self) -> bool:
        """MoE-Adapters routing test images by DDAS (never with one router: a CIL run has a single task branch)."""
        return self.uses_adapters and self.selector.enabled and not self.moe.single_router

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunConfig:
        """The config of a nested mapping; `protocol: paper` first fills in the settings it implies (a value the
        mapping states itself is kept, and must then agree with the protocol)."""
        from moecl.protocol import expand_protocol

        return from_dict(cls, expand_protocol(data or {}))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def results_part(self) -> RunConfig:
        """This config without the fields that only say where and how fast it runs (RUNTIME_FIELDS): two runs
        whose results_part are equal compute the same thing (up to float rounding between devices), so --resume
        may change the others."""
        defaults = RunConfig()
        return dataclasses.replace(self, **{name: getattr(defaults, name) for name in RUNTIME_FIELDS})


# Where and how fast a run computes (and what it reports), not what: a run may be resumed on another device, with
# other workers or other trackers.
RUNTIME_FIELDS = ("device", "data", "logging")


def to_dict(obj: Any) -> Any:
    """Plain JSON/YAML-serialisable form (tuples become lists, mappings dicts)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping, type-checking leaves and rejecting unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        kwargs[key] = _coerce(hints[key], value, where)
    missing = [f.name for f in fields.values() if f.name not in kwargs and _required(f)]
    if missing:
        raise ConfigError(f"{path or 'config'}: missing required key '{missing[0]}'")
    return cls(**kwargs)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """`value` checked against type hint `tp` (and normalised: int -> float, list -> tuple, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        errors = []
        for arg in members:
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(exc)
        # One member (an optional field), or one that failed inside the value (an element of a list): its own
        # error says most. Otherwise none fits at the top: say what would.
        inner = [e for e in errors if not str(e).startswith(f"{where}: ")]
        if len(members) == 1 or inner:
            raise (inner or errors)[0]
        wants = " or ".join(_describe(a) for a in members)
        raise ConfigError(f"{where}: {value!r} is not allowed; it must be {wants}")
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin in (Mapping, dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, where): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _describe(tp: Any) -> str:
    """What a value of type hint `tp` looks like, for messages."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    names = {float: "a number", int: "an integer", bool: "true/false", str: "a string"}
    return names.get(tp, "a list" if typing.get_origin(tp) is tuple else "a mapping")


def quickstart_config() -> RunConfig:
    """The offline default run (`moecl quickstart`); configs/quickstart.yaml states the same values (tested).

    Lite backbone at 128 px, the paper's MoE (22 experts, top-2, activate-freeze) in every MiniLM block and the last
    EfficientNet blocks, DDAS with an auto threshold and the bundled ImageNet sample as reference, a 4-task stream
    of bundled real images. Training images are not augmented so the frozen prefix is computed once per image.
    """
    return RunConfig(
        method="moe_adapters",
        backbone=BackboneConfig(name="lite", image_size=128, lite_image_blocks=3),
        moe=MoEConfig(),
        # reference images as negatives and AEs trained to convergence: 5 selector seeds on this stream route
        # learned tasks right 94.9% (vs 97.1%) and send 84.0% (vs 57.6%) of unseen ones to zero-shot
        selector=SelectorConfig(
            iterations=1000,
            reference_iterations=1000,
            lr_step_epochs=50,
            threshold="auto",
            negatives="reference",
            negative_weight=0.2,
        ),
        optim=OptimConfig(
            iterations=120, batch_size=32, lr=2e-3, warmup_steps=10, label_smoothing=0.2, train_augment=False
        ),
        stream=StreamConfig(name="quickstart"),
        threads=2,
    )
