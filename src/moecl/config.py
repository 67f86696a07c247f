"""Frozen dataclass configs. The CLI turns YAML/argv into plain dicts; `RunConfig.from_dict` validates them here.

Every field has the paper's value (method.md) as its default where the paper fixes one, so a config file only
states what differs. Unknown keys are rejected with a "did you mean" hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union


class ConfigError(ValueError):
    """A config value or key is wrong; the message is meant for the user as-is."""


MIB = 1 << 20  # the unit of the *_mb memory settings
PRECISIONS = ("fp32", "bf16", "fp16")  # OptimConfig.precision
DEVICE_FORMAT = re.compile(r"auto|cpu|cuda(:\d+)?")  # RunConfig.device; availability: moecl.device.resolve_device


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "clip"  # "clip" (HF CLIPModel) or "lite" (EfficientNet-Lite0 + MiniLM, offline)
    model: str = "openai/clip-vit-base-patch16"  # hub id or local directory (clip)
    image_size: int = 224
    lite_image_blocks: int = 3  # lite: number of last EfficientNet blocks that get MoE sites
    cache_prefix: bool = True  # reuse frozen-prefix outputs (layers before the first MoE site)


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 22
    top_k: int = 2
    bottleneck: int = 64
    scale: float = 0.1  # expert output multiplier
    dropout: float = 0.1
    towers: tuple[str, ...] = ("image", "text")
    layers: tuple[int, ...] | None = None  # None = every block of each tower
    noisy_gating: bool = True  # noise applies in training mode (and at evaluation with eval_noise)
    eval_noise: bool = False  # router noise also at evaluation (the official CIL code's; protocol "paper", CIL)
    freeze_per_task: int = 2  # activate-freeze: most-used experts frozen per block after each task (0 = off)
    load_balance_weight: float = 0.0  # reference computes and discards it: 0 is faithful
    single_router: bool = False  # CIL: one router for all steps


@dataclass(frozen=True)
class SelectorConfig:
    enabled: bool = True
    features: str = "backbone"  # "backbone" (frozen image embedding of the run's backbone), "alexnet" (paper)
    hidden: int = 100
    iterations: int = 300
    reference_iterations: int = 1000
    batch_size: int = 64
    lr: float = 0.01  # 0.003 few-shot
    weight_decay: float = 1e-4
    lr_step_epochs: int = 10
    threshold: float | str = "auto"  # a number (paper: 0.0655 full-shot, 0.06 few-shot) or "auto"
    auto_quantile: float = 0.99  # "auto": this quantile of held-out in-distribution errors of each task
    auto_margin: float = 1.0  # "auto": threshold = auto_margin * that quantile
    heldout_fraction: float = 0.2  # "auto": share of each task's features held out of AE training for calibration
    # Outlier exposure: "reference" also trains each task AE to NOT explain the reference images better than the
    # reference AE does (hinge on e_t(r) / e_ref(r) >= 1, weight negative_weight); None = the paper's plain MSE AE.
    negatives: str | None = None
    negative_weight: float = 0.2
    reference: str | None = "imagenet_sample"  # reference data: dataset name or folder/zip path; None = no ref AE
    reference_max_images: int | None = None
    reference_shots: int | None = None  # k reference images per class (official few-shot: 5), None = all
    reference_splits: tuple[str, ...] | None = None  # reference splits read (official: ("train",)), None = every one
    # How a test batch is routed: "image" (each image on its own errors) or "batch" (the official code's: one branch
    # for the whole evaluation batch of optim.eval_batch_size images, from their mean errors).
    decision: str = "image"
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


@dataclass(frozen=True)
class OptimConfig:
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
    precision: str = "fp32"  # training autocast: "fp32" (paper), "bf16" or "fp16" (fp16 with loss scaling on GPU)
    compile: bool = False  # torch.compile the model's blocks (opt-in; first steps are slower while compiling)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"optim.precision: '{self.precision}' is not one of {', '.join(PRECISIONS)} (default fp32)"
            )


@dataclass(frozen=True)
class CustomTaskConfig:
    name: str
    path: str
    train_split: str = "train"
    test_split: str = "test"
    classnames: Mapping[str, str] | None = None
    templates: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StreamConfig:
    name: str = "quickstart"  # mtil, cifar100, tinyimagenet, quickstart, or any name for a custom stream
    kind: str = "mtil"  # "mtil" (task-incremental, multi-domain) or "cil" (class-incremental)
    order: str = "I"  # MTIL order I / II
    datasets: tuple[str, ...] | None = None  # explicit dataset order; default from name/order
    shots: int | None = None  # k images per class (few-shot); None = full
    steps: int = 10  # CIL: number of incremental steps
    base_classes: int = 0  # CIL: classes in the first step (TinyImageNet: 100)
    root: str | None = None  # dataset root; None = ../shared/data if present, else the in-repo subset
    max_train_per_class: int | None = None
    max_test_per_class: int | None = None
    tasks: tuple[CustomTaskConfig, ...] = ()  # custom stream from folders/zips
    on_bad_image: str = "error"  # "error" or "skip"


@dataclass(frozen=True)
class DataConfig:
    """How images reach the model: never what the results are (a resumed run may use other values)."""

    workers: int | str = "auto"  # DataLoader worker processes: "auto" (a share of the cores), 0 = in-process
    prefetch: int = 2  # batches each worker prepares ahead
    # Host memory for cached frozen prefixes / decoded images (MiB; 0 = none). Entries past the budget are simply
    # not cached: results are identical with any budget (tested), only decoding is repeated.
    cache_mb: float = 2048.0
    # Evaluation reuses what cannot change between rows: zero-shot embeddings and DDAS errors under finished
    # autoencoders (off: recomputed every row, for checking; the results are identical).
    reuse_eval: bool = True

    def __post_init__(self) -> None:
        w = self.workers
        if (isinstance(w, str) and w != "auto") or (isinstance(w, int) and w < 0):
            raise ConfigError(f"data.workers: {w!r} is not allowed; it must be an integer >= 0 or 'auto'")
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch: {self.prefetch!r} is not allowed; it must be >= 1")
        if self.cache_mb < 0:
            raise ConfigError(f"data.cache_mb: {self.cache_mb!r} is not allowed; it must be >= 0 (0: no cache)")


TRACKERS = ("jsonl", "csv", "tensorboard", "wandb")  # LoggingConfig.backends
WANDB_MODES = ("offline", "online")


@dataclass(frozen=True)
class LoggingConfig:
    """Experiment tracking (moecl.tracking). log.jsonl is always written; the other backends are added to it."""

    backends: tuple[str, ...] = ("jsonl",)  # any of TRACKERS; tensorboard and wandb need their optional extras
    every: int = 10  # optimiser steps between two logged training steps (loss, LR)
    wandb_project: str = "moecl"
    wandb_mode: str = "offline"  # offline needs no network or account; `wandb sync` uploads the run later

    def __post_init__(self) -> None:
        for name in self.backends:
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, TRACKERS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"logging.backends: '{name}' is not one of {', '.join(TRACKERS)}{hint}")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"logging.backends: {list(self.backends)} names a backend twice")
        if self.every < 1:
            raise ConfigError(f"logging.every: {self.every!r} is not allowed; it must be >= 1")
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb_mode: '{self.wandb_mode}' is not one of {', '.join(WANDB_MODES)}")


@dataclass(frozen=True)
class MethodConfig:
    lwf_temperature: float = 2.0
    lwf_weight: float = 1.0
    wise_alpha: float = 0.5  # weight of the fine-tuned model in the weight-space ensemble
    zscl_weight: float = 1.0
    zscl_temperature: float = 2.0
    zscl_reference: str = "imagenet_sample"
    finetune_text: bool = False


@dataclass(frozen=True)
class RunConfig:
    # "moecl" (our defaults) or "paper": the official code's protocol, expanded by `from_dict` into the explicit
    # fields that moecl.protocol.paper_settings names, and checked here (docs/reproduce.md)
    protocol: str = "moecl"
    method: str = "moe_adapters"
    seed: int = 42
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    baselines: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    device: str = "auto"  # "auto" (the first CUDA device when there is one, else cpu), "cpu", "cuda", "cuda:N"
    checkpoint_every: int = 0  # steps between mid-task checkpoints (0 = only after each task)
    deterministic: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if not DEVICE_FORMAT.fullmatch(self.device):
            raise ConfigError(f"device: {self.device!r} is not allowed; it must be auto, cpu, cuda or cuda:N")
        from moecl.protocol import check_protocol

        check_protocol(self)

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
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
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


def _type_name(tp: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp) if a is not type(None))


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
