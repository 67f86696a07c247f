"""moecl.config: every dataclass checks itself, so the library path (`RunConfig.from_dict` -> `build_learner`)
rejects what the CLI rejects, with the same one-line message."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from moecl.backbone import BACKBONES
from moecl.config import (
    BackboneName,
    ConfigError,
    DataConfig,
    MethodName,
    MoEConfig,
    OptimConfig,
    RunConfig,
    SelectorConfig,
    StreamConfig,
    quickstart_config,
)
from moecl.methods import METHODS

# The four bad values of issue 19, each accepted by RunConfig.from_dict before the checks moved into the config.
LIBRARY_PATH = [
    ({"optim": {"batch_size": 0}}, "optim.batch_size: 0 is not allowed; it must be >= 1"),
    ({"moe": {"top_k": 30}}, "moe.top_k: 30 is not allowed; it must be between 1 and moe.num_experts (22)"),
    ({"backbone": {"name": "vit"}}, "backbone.name: 'vit' is not one of clip, lite"),
    ({"stream": {"kind": "domain"}}, "stream.kind: 'domain' is not one of mtil, cil"),
]


@pytest.mark.parametrize(("data", "message"), LIBRARY_PATH, ids=[next(iter(d)) for d, _ in LIBRARY_PATH])
def test_library_path_rejects_what_the_cli_rejects(data, message):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    assert str(info.value) == message


def test_the_issue_config_fails_on_its_first_bad_section():
    bad = {"optim": {"batch_size": 0}, "moe": {"top_k": 30}, "backbone": {"name": "vit"}, "stream": {"kind": "domain"}}
    with pytest.raises(ConfigError, match=r"^optim.batch_size: 0 is not allowed"):
        RunConfig.from_dict(bad)


def test_direct_construction_and_replace_are_checked_too():
    with pytest.raises(ConfigError, match=r"^moe.top_k: 5 is not allowed; it must be between 1 and moe.num_experts \(4\)"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match=r"^optim.precision: 'fp61' is not one of fp32, bf16, fp16 \(did you mean"):
        OptimConfig(precision="fp61")
    with pytest.raises(ConfigError, match=r"^moe.top_k: 2 is not allowed; it must be between 1 and moe.num_experts \(1\)"):
        dataclasses.replace(MoEConfig(), num_experts=1)  # the cross-field rule
    with pytest.raises(ConfigError, match=r"^optim.batch_size: expected an integer, got '8'"):
        OptimConfig(batch_size="8")
    with pytest.raises(ConfigError, match=r"^data.workers: -1 is not allowed; it must be an integer >= 0 or 'auto'"):
        DataConfig(workers=-1)
    with pytest.raises(ConfigError, match=r"^device: 'gpu' is not allowed; it must be auto, cpu, cuda or cuda:N"):
        RunConfig(device="gpu")


def test_values_are_normalised_to_their_types():
    cfg = OptimConfig(betas=[0.9, 0.99], lr=1)
    assert cfg.betas == (0.9, 0.99) and isinstance(cfg.lr, float)
    assert StreamConfig(datasets=["a", "b"]).datasets == ("a", "b")
    assert SelectorConfig(threshold=0).threshold == 0.0 and SelectorConfig().threshold == "auto"


def test_union_errors_are_kept():
    # an optional field reports its own type's error; a bad element inside a list names the element
    with pytest.raises(ConfigError, match=r"^optim.epochs: expected an integer, got 'x'$"):
        RunConfig.from_dict({"optim": {"epochs": "x"}})
    with pytest.raises(ConfigError, match=r"^moe.layers\[1\]: expected an integer, got 'a'$"):
        RunConfig.from_dict({"moe": {"layers": [1, "a"]}})
    with pytest.raises(ConfigError, match=r"^selector.threshold: 'high' is not allowed; it must be a number or 'auto'$"):
        RunConfig.from_dict({"selector": {"threshold": "high"}})


def test_enums_match_the_code_that_looks_them_up():
    assert set(typing.get_args(MethodName)) == set(METHODS)
    assert set(typing.get_args(BackboneName)) == set(BACKBONES)


def test_defaults_and_quickstart_are_valid_and_round_trip():
    for cfg in (RunConfig(), quickstart_config()):
        assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_selector_kinds_and_their_rules():
    from moecl.config import AgnosticClasses, SelectorKind
    from moecl.selector.base import SELECTORS

    assert set(typing.get_args(SelectorKind)) == set(SELECTORS)
    assert typing.get_args(AgnosticClasses) == ("routed", "union")
    assert SelectorConfig().kind == "ddas" and SelectorConfig().agnostic_classes == "routed"
    ok = SelectorConfig(kind="prototype", prototype_quantile=1, agnostic_classes="union")
    assert ok.prototype_quantile == 1.0 and ok.agnostic_classes == "union"
    # the prototypes are of the backbone's own features, and their thresholds are calibrated
    alexnet = r"^selector.features: 'alexnet' is not allowed; it must be 'backbone' with selector.kind 'prototype'"
    with pytest.raises(ConfigError, match=alexnet):
        RunConfig.from_dict({"selector": {"kind": "prototype", "features": "alexnet"}})
    numeric = r"^selector.threshold: 0.06 is not allowed; it must be 'auto' with selector.kind 'prototype'"
    with pytest.raises(ConfigError, match=numeric):
        SelectorConfig(kind="prototype", threshold=0.06)
    assert SelectorConfig(kind="ddas", features="alexnet", threshold=0.06).threshold == 0.06  # DDAS may
    with pytest.raises(ConfigError, match=r"^selector.kind: 'knn' is not one of ddas, prototype"):
        RunConfig.from_dict({"selector": {"kind": "knn"}})
    with pytest.raises(ConfigError, match=r"^selector.agnostic_classes: 'all' is not one of routed, union"):
        SelectorConfig(agnostic_classes="all")
    for bad in (0.0, -0.5, 1.5):
        message = rf"^selector.prototype_quantile: {bad} is not allowed; it must be in \(0, 1\]$"
        with pytest.raises(ConfigError, match=message):
            SelectorConfig(kind="prototype", prototype_quantile=bad)
