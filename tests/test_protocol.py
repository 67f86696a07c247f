"""protocol: paper — one field that expands into the explicit settings of the official code's protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moecl.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_our_defaults_switch_every_official_behaviour_off():
    cfg = RunConfig()
    assert cfg.protocol == "moecl"
    sel = cfg.selector
    assert (sel.decision, sel.untrained_in_argmin, sel.train_augment) == ("image", False, False)
    assert (sel.reference_shots, sel.reference_splits) == (None, None)
    assert (cfg.moe.eval_noise, cfg.optim.eval_augment) == (False, False)


def test_paper_expands_into_the_official_mtil_settings():
    full = RunConfig.from_dict({"protocol": "paper", "stream": {"name": "mtil"}, "selector": {"threshold": 0.0655}})
    sel = full.selector
    assert (sel.decision, sel.untrained_in_argmin, sel.train_augment) == ("batch", True, True)
    assert (sel.reference_shots, sel.reference_splits, full.optim.eval_batch_size) == (None, ("train",), 128)
    assert (full.moe.eval_noise, full.optim.eval_augment) == (False, False)  # the MTIL code evaluates without
    few = RunConfig.from_dict({"protocol": "paper", "stream": {"name": "mtil", "shots": 5}, "selector": {"threshold": 0.06}})
    assert few.selector.reference_shots == 5  # the reference AE sees 5 TinyImageNet images per class
    assert RunConfig.from_dict(few.to_dict()) == few  # a run's config.yaml reads back as itself


def test_paper_expands_into_the_official_cil_settings():
    cil = RunConfig.from_dict({"protocol": "paper", "stream": {"name": "cifar100", "kind": "cil"}})
    assert (cil.moe.eval_noise, cil.optim.eval_augment) == (True, True)
    assert cil.selector.decision == "image"  # no DDAS in CIL: nothing to change there


def test_a_setting_that_contradicts_the_protocol_is_an_error():
    with pytest.raises(ConfigError, match=r"selector.decision: 'image' contradicts protocol 'paper'"):
        RunConfig.from_dict({"protocol": "paper", "selector": {"decision": "image", "threshold": 0.0655}})
    with pytest.raises(ConfigError, match="optim.eval_augment"):
        RunConfig.from_dict({"protocol": "paper", "stream": {"kind": "cil"}, "optim": {"eval_augment": False}})
    with pytest.raises(ConfigError, match="protocol: 'official' is not one of moecl, paper"):
        RunConfig.from_dict({"protocol": "official"})
    # stated values that agree are fine, and each switch may be used alone under our protocol
    RunConfig.from_dict({"protocol": "paper", "selector": {"decision": "batch", "threshold": 0.0655}})
    # the paper's rule lets untrained autoencoders compete, so it needs the paper's numeric threshold
    with pytest.raises(ConfigError, match="selector.untrained_in_argmin.*give the paper's selector.threshold"):
        RunConfig.from_dict({"protocol": "paper"})
    assert RunConfig.from_dict({"selector": {"train_augment": True}}).selector.train_augment


@pytest.mark.parametrize("paper", sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*_paper.yaml")))
def test_every_paper_config_is_its_base_config_under_protocol_paper(paper):
    data = yaml.safe_load((ROOT / paper).read_text())
    base = yaml.safe_load((ROOT / str(paper).replace("_paper.yaml", ".yaml")).read_text())
    cfg = RunConfig.from_dict(data)
    assert cfg.protocol == "paper"
    if cfg.selector.enabled and not cfg.moe.single_router:  # MTIL: the official loop's one extra AE iteration
        base["selector"].update(iterations=301, reference_iterations=1001)
    assert cfg == RunConfig.from_dict({**base, "protocol": "paper"})


def test_protocol_paper_on_the_command_line(tmp_path, capsys):
    import json

    from moecl.cli import main

    config = str(ROOT / "configs/mtil/order1_5shot.yaml")
    assert main(["plan", "--config", config, "protocol=paper", f"stream.root={tmp_path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sizes"]["reference_images"] == 5 * 200  # TinyImageNet train, 5-shot
    assert main(["plan", "--config", config, "protocol=paper", "selector.decision=image"]) != 0
    assert "contradicts protocol 'paper'" in capsys.readouterr().err
