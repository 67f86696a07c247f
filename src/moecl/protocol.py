"""Protocols: `protocol: moecl` (our defaults) or `protocol: paper` (the official code's, JiazuoYu/MoE-Adapters4CL).

The paper protocol is not a second code path: it is a set of explicit config fields, each switching on one
behaviour of the official code (docs/reproduce.md lists them, why our default differs, and the numbers the paper
reports). `expand_protocol` fills them into a config mapping before it is built; `check_protocol` rejects a built
config that says `protocol: paper` but sets one of them otherwise, so a run's config.yaml always means what it says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def paper_settings(class_incremental: bool, shots: int | None) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} the official code uses, for a class-incremental stream or a multi-domain one with `shots`."""
    if class_incremental:
        # continual_clip: router noise is tied to a flag that stays on at test time; the test set is read with
        # the training transform (the first transform clip.load returns)
        return {"moe": {"eval_noise": True}, "optim": {"eval_augment": True}}
    return {
        "selector": {
            # mtil/src/models/evaluation.py: one MSE per autoencoder over the whole test batch (batch-size-eval 128,
            # unshuffled), argmin over all 12 autoencoders of the list, trained or not
            "decision": "batch",
            "untrained_in_argmin": True,
            # AutoEncoder.py: every step reads the next batch of the training loader (training transform)
            "train_augment": True,
            # the reference autoencoder reads TinyImageNet's train split, 5 images per class in few-shot runs
            "reference_shots": shots,
            "reference_splits": ("train",),
        },
        "optim": {"eval_batch_size": 128},
    }


def expand_protocol(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with the paper settings filled in under what it states itself (when data["protocol"] is "paper")."""
    data = dict(data)
    if data.get("protocol") != "paper":
        return data
    from moecl.config import ConfigError, StreamConfig, from_dict

    stream = from_dict(StreamConfig, data.get("stream") or {}, "stream")
    for section, values in paper_settings(stream.class_incremental, stream.shots).items():
        given = data.get(section) or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"{section}: expected a mapping, got {given!r}")
        data[section] = {**values, **given}
    return data


def check_protocol(cfg: Any) -> None:
    """Raises ConfigError unless, for protocol "paper", every paper setting has its paper value (RunConfig's field
    type admits only the known protocols)."""
    from moecl.config import ConfigError

    if cfg.protocol != "paper":
        return
    for section, values in paper_settings(cfg.stream.class_incremental, cfg.stream.shots).items():
        for name, want in values.items():
            have = getattr(getattr(cfg, section), name)
            if have != want:
                raise ConfigError(
                    f"{section}.{name}: {have!r} contradicts protocol 'paper', which sets {want!r} (the official "
                    f"code's); remove the override, or use protocol: moecl"
                )
