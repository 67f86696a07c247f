"""Bad input to `moecl` (issue 11): each gives exactly one `error:` line naming the problem, a non-zero exit, no
traceback, and leaves nothing half-written. The tables below are the list of bad inputs tried."""

from __future__ import annotations

import copy
import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from moecl import checkpoint
from moecl.cli import main
from moecl.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    # `moecl train` in-process sets deterministic mode; leave the test process as we found it.
    deterministic, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _task(root: Path, n_train: int = 2) -> Path:
    for split, n in (("train", n_train), ("test", 1)):
        for c, (name, rgb) in enumerate({"red": (220, 30, 30), "blue": (30, 30, 220)}.items()):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.new("RGB", (36, 36), tuple(v + 10 * k + c for v in rgb)).save(d / f"{k}.png")
    return root


@pytest.fixture
def base_cfg(tiny_clip_dir, tmp_path) -> dict:
    """One tiny task of two classes on the tiny CLIP: a full run takes a second or two."""
    return {
        "backbone": {"name": "clip", "model": str(tiny_clip_dir), "image_size": 32, "cache_prefix": False},
        "moe": {"num_experts": 4, "top_k": 2, "bottleneck": 8},
        "selector": {"enabled": False},
        "optim": {"iterations": 2, "batch_size": 2, "warmup_steps": 1, "eval_batch_size": 4},
        "stream": {"name": "tiny", "tasks": [{"name": "colours", "path": str(_task(tmp_path / "colours"))}]},
        "checkpoint_every": 1,
    }


def write_config(tmp_path: Path, cfg: dict | str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return path


def one_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert a non-zero exit with exactly one `error:` line first and no traceback; return it."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert rc != 0, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def changed(cfg: dict, key: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return cfg


# (config key, bad value, text the error line must contain). All fail before the run directory is created.
BAD_VALUES = [
    ("sed", 1, "unknown config key 'sed' (did you mean 'seed'?)"),
    ("optim.iteratons", 3, "unknown config key 'optim.iteratons' (did you mean 'iterations'?)"),
    ("optim.iterations", "ten", "optim.iterations: expected an integer, got 'ten'"),
    ("optim.lr", "fast", "optim.lr: expected a number, got 'fast'"),
    ("seed", True, "seed: expected an integer, got True"),
    ("optim", 5, "optim: expected a mapping, got int"),
    ("optim.betas", [0.9], "optim.betas: expected 2 values, got 1"),
    ("optim.lr_per_task", {"colours": "x"}, "optim.lr_per_task.colours: expected a number, got 'x'"),
    ("method", "foo", "method: 'foo' is not one of moe_adapters, zero_shot, "),
    ("method", "finetun", "method: 'finetun' is not one of moe_adapters, zero_shot, finetune, lwf, wise_ft, zscl (did"),
    ("optim.batch_size", 0, "optim.batch_size: 0 is not allowed; it must be >= 1"),
    ("optim.eval_batch_size", 0, "optim.eval_batch_size: 0 is not allowed; it must be >= 1"),
    ("optim.iterations", -1, "optim.iterations: -1 is not allowed; it must be >= 0"),
    ("optim.warmup_steps", -5, "optim.warmup_steps: -5 is not allowed; it must be >= 0"),
    ("optim.label_smoothing", 1.5, "optim.label_smoothing: 1.5 is not allowed; it must be in [0, 1)"),
    ("moe.top_k", 5, "moe.top_k: 5 is not allowed; it must be between 1 and moe.num_experts (4)"),
    ("moe.num_experts", 0, "moe.num_experts: 0 is not allowed"),
    ("checkpoint_every", -1, "checkpoint_every: -1 is not allowed; it must be >= 0"),
    ("threads", 0, "threads: 0 is not allowed; it must be >= 1 or null"),
    ("selector.threshold", "high", "selector.threshold: 'high' is not allowed; it must be a number or 'auto'"),
    ("selector.threshold", -0.1, "selector.threshold: -0.1 is not allowed; it must be a number >= 0 or 'auto'"),
    ("stream.shots", 0, "stream.shots: 0 is not allowed; it must be >= 1"),
    ("stream.on_bad_image", "ignore", "stream.on_bad_image: 'ignore' is not one of error, skip"),
    ("stream.kind", "til", "stream.kind: 'til' is not one of mtil, cil (did you mean "),
    ("stream.root", "/nonexistent/datasets", "stream.root: /nonexistent/datasets is not a directory"),
    ("stream.tasks", [{"name": "x", "path": "/nonexistent/x"}], "/nonexistent/x: not found (expected a folder"),
    ("backbone.name", "resnet", "backbone.name: 'resnet' is not one of clip, lite"),
    ("backbone.model", "/nonexistent/clip", "backbone.model: cannot load CLIP '/nonexistent/clip'"),
    ("moe.layers", [99], "moe.layers: layer 99 out of range for the image tower (2 blocks)"),
    ("moe.towers", ["audio"], "moe.towers[0]: 'audio' is not one of image, text"),
    ("moe.towers", [], "moe.towers: [] is not allowed; it must be at least one of image, text"),
    ("stream.tasks", [{"name": "x"}], "stream.tasks[0]: missing required key 'path'"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_VALUES])
def test_bad_config_value(key, value, message, base_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_error(capsys, ["train", "--config", str(write_config(tmp_path, changed(base_cfg, key, value))),
                              "--out", str(out), "--quiet"])  # fmt: skip
    assert message in line, line
    assert not out.exists(), "nothing written for a config that cannot run"


# (what is wrong, config file text or None for no file, extra argv, text the error line must contain)
BAD_FILES_AND_ARGS = [
    ("missing config file", None, [], "config file not found: "),
    ("YAML syntax", "optim: [1,\n", [], "not valid YAML (while parsing a flow node)"),
    ("top level is a list", "- 1\n- 2\n", [], "expected a mapping of config keys at the top level"),
    ("override without =", "", ["optim.iterations"], "override 'optim.iterations' must look like key.sub=value"),
    ("override bad YAML", "", ["optim.iterations=[1"], "override 'optim.iterations=[1': value is not valid YAML"),
    ("override unknown key", "", ["optim.iteratons=3"], "unknown config key 'optim.iteratons' (did you mean"),
    ("override into a number", "", ["seed.x=1"], "seed: expected an integer, got {'x': 1}"),
    ("--resume and --overwrite", "", ["--resume", "--overwrite"], "pass only one of them"),
    ("--resume without a run", "", ["--resume"], "has no config.yaml; nothing to resume"),
]


@pytest.mark.parametrize(
    ("what", "text", "argv", "message"), BAD_FILES_AND_ARGS, ids=[c[0] for c in BAD_FILES_AND_ARGS]
)
def test_bad_file_or_argument(what, text, argv, message, base_cfg, tmp_path, capsys):
    if text == "":
        config = write_config(tmp_path, base_cfg)
    elif text is None:
        config = tmp_path / "missing.yaml"
    else:
        config = write_config(tmp_path, text)
    out = tmp_path / "run"
    line = one_error(capsys, ["train", "--config", str(config), "--out", str(out), "--quiet", *argv])
    assert message in line, line
    assert not out.exists()


def test_run_directory_guards(base_cfg, tmp_path, capsys):
    """--out of a finished/unfinished run, a file as --out, --resume of another config or a damaged config.yaml."""
    config = write_config(tmp_path, base_cfg)
    cfg = RunConfig.from_dict(base_cfg)
    finished, unfinished, other = tmp_path / "finished", tmp_path / "unfinished", tmp_path / "other"
    for run in (finished, unfinished, other):
        (run / "checkpoints").mkdir(parents=True)
    (finished / "metrics.json").write_text("{}")
    (other / "config.yaml").write_text(yaml.safe_dump(cfg.replace(seed=7).to_dict()))
    (unfinished / "config.yaml").write_text("seed: [unclosed\n")
    (tmp_path / "file").write_text("x")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def error(out: Path, *flags: str) -> str:
        return one_error(capsys, ["train", "--config", str(config), "--out", str(out), "--quiet", *flags])

    assert f"{finished} already holds a finished run; pass --overwrite" in error(finished)
    assert f"{unfinished} holds an unfinished run; continue it with --resume or pass --overwrite" in error(unfinished)
    assert "is a file; give a directory for the run" in error(tmp_path / "file")
    assert f"{other} belongs to a different config (seed: 7 in the run, 42 now)" in error(other, "--resume")
    assert f"{unfinished / 'config.yaml'} is damaged" in error(unfinished, "--resume")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched


def test_corrupt_image_errors_unless_skipping(base_cfg, tmp_path, capsys):
    bad = Path(base_cfg["stream"]["tasks"][0]["path"]) / "train" / "red" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    config = write_config(tmp_path, base_cfg)
    line = one_error(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "a"), "--quiet"])
    assert f"cannot read image {bad}" in line and "set `stream.on_bad_image: skip`" in line, line
    assert not (tmp_path / "a" / "metrics.json").exists()
    config = write_config(tmp_path, changed(base_cfg, "stream.on_bad_image", "skip"))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert {r["key"] for r in log if r["event"] == "skipped_image"} == {str(bad)}


def test_disk_full_while_checkpointing_then_resume(base_cfg, tmp_path, capsys, monkeypatch):
    """ENOSPC half-way through the end-of-task checkpoint: one error line, no partial checkpoint or temp file, the
    earlier checkpoints intact, and --resume (space freed) finishes the run."""
    config, out = write_config(tmp_path, base_cfg), tmp_path / "run"
    real_create = checkpoint._create_write

    def full_disk(path: Path, data, shown: Path) -> None:
        if shown.name == checkpoint.TENSORS_FILE and shown.parent.name.endswith("-task0"):
            path.write_bytes(bytes(data[: len(data) // 2]))  # part of the file got written, then the disk was full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_create(path, data, shown)

    monkeypatch.setattr(checkpoint, "_create_write", full_disk)
    line = one_error(capsys, ["train", "--config", str(config), "--out", str(out), "--quiet"])
    assert line.startswith("error: [Errno 28] disk full: could not write ") and "-task0 (No space" in line, line
    assert "free some space and retry" in line
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["000001-zero_shot", "000002-task0-step1"], names  # no temp dir, no half checkpoint
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(checkpoint, "_create_write", real_create)  # space freed
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet", "--resume"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["accuracy_matrix"]) == 1


def test_resume_with_only_damaged_checkpoints(base_cfg, tmp_path, capsys):
    config, out = write_config(tmp_path, base_cfg), tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    for ckpt in (out / "checkpoints").iterdir():
        if ckpt.is_dir():
            (ckpt / "tensors.safetensors").write_bytes(b"garbage")
    (out / "metrics.json").unlink()
    line = one_error(capsys, ["train", "--config", str(config), "--out", str(out), "--quiet", "--resume"])
    assert f"error: no valid checkpoint in {out / 'checkpoints'}" in line
    assert "start the run again without --resume (or with --overwrite)" in line


def test_other_commands_on_a_missing_run(tmp_path, capsys):
    for argv in (["eval", "--run"], ["report", "--run"], ["predict", str(tmp_path), "--run"]):
        line = one_error(capsys, [*argv, str(tmp_path / "nope")])
        assert "is not a finished run directory (no metrics.json / config.yaml)" in line


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_shipped_configs_pass_the_value_checks(config):
    assert isinstance(RunConfig.from_dict(yaml.safe_load((ROOT / config).read_text())), RunConfig)
