"""`moecl` command line: the only module that reads argv or YAML.

Every command exits 0 on success; on bad input it prints one line starting with `error:` on stderr and exits
non-zero, without a traceback and without leaving anything half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from moecl.branches import ZERO_SHOT_NAME
from moecl.config import ConfigError, RunConfig, quickstart_config

EXIT_USAGE = 2
DEVICE_HELP = "auto (default: the first GPU when there is one), cpu, cuda or cuda:N; overrides the config's device"
# What a run writes into --out (besides config.yaml); --overwrite removes exactly these.
RUN_OUTPUTS = ("checkpoints", "metrics.json", "log.jsonl", "report.md", "accuracy_matrix.png")
RUN_OUTPUTS += ("adapters", "selector", "stream.json", "csv", "tensorboard", "wandb")  # the last: logging.backends


class CLIError(Exception):
    """Bad user input: reported as one `error:` line."""


# --------------------------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------------------------
def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CLIError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CLIError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a mapping of config keys at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`optim.iterations=10` style overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise CLIError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise CLIError(f"override '{item}': value is not valid YAML ({str(exc).splitlines()[0]})") from exc
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CLIError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def resolve_config(config: Path | None, method: str | None, overrides: Sequence[str]) -> tuple[RunConfig, Path]:
    """-> (validated config, folder that relative paths in it are relative to)."""
    if config is None:
        data = quickstart_config().to_dict()
        base = Path.cwd()
    else:
        data = load_yaml(config)
        base = config.resolve().parent
    data = apply_overrides(data, overrides)
    if method:
        data["method"] = method
    try:
        cfg = RunConfig.from_dict(data)  # every rule lives in the config dataclasses
    except ConfigError as exc:
        raise CLIError(f"{config or 'quickstart config'}: {exc}") from exc
    return cfg, base


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# train / quickstart
# --------------------------------------------------------------------------------------------------------------
def check_run_dir(out: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Raise CLIError when `out` cannot take this run (--resume of another config, a finished run without
    --overwrite, ...). Writes nothing, so it runs before the slow model load."""
    existing = out / "config.yaml"
    if resume and overwrite:
        raise CLIError("--resume continues the run in --out and --overwrite replaces it: pass only one of them")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a directory for the run")
    if resume:
        if not existing.is_file():
            raise CLIError(f"--resume: {out} has no config.yaml; nothing to resume (start without --resume)")
        # Compared as configs, not text: fields added later with their defaults do not make a run unresumable.
        try:
            saved = RunConfig.from_dict(yaml.safe_load(existing.read_text(encoding="utf-8")))
        except (yaml.YAMLError, ConfigError, UnicodeDecodeError) as exc:
            raise CLIError(
                f"--resume: {existing} is damaged ({str(exc).splitlines()[0]}); start a new run in another --out"
            ) from exc
        if saved.results_part() != cfg.results_part():  # the device and data workers may change on resume
            diffs = _differences(saved.results_part().to_dict(), cfg.results_part().to_dict())
            raise CLIError(
                f"--resume: {out} belongs to a different config ({'; '.join(diffs[:3])}"
                f"{' ...' if len(diffs) > 3 else ''}); use the same config or another --out directory"
            )
        return
    if out.exists() and not overwrite:
        if (out / "metrics.json").exists():
            raise CLIError(f"{out} already holds a finished run; pass --overwrite to replace it or choose --out")
        if (out / "checkpoints").exists():
            raise CLIError(f"{out} holds an unfinished run; continue it with --resume or pass --overwrite")


def prepare_run_dir(out: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """check_run_dir, then (unless resuming) clear the outputs of a run being overwritten and write config.yaml."""
    from moecl.checkpoint import atomic_write_text

    check_run_dir(out, cfg, resume, overwrite)
    if resume:
        return
    if overwrite and out.exists():
        import shutil

        for child in RUN_OUTPUTS:
            p = out / child
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg.to_dict()))


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    """'key: <run value> in the run, <value> now' for every leaf that differs between two config dicts."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in list(saved) + [k for k in now if k not in saved]:
            out += _differences(saved.get(key), now.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if saved == now else [f"{where}: {saved!r} in the run, {now!r} now"]


def check_data_root(cfg: RunConfig, base: Path) -> None:
    """A stream.root that does not exist is one clear error (instead of one "not found" per dataset)."""
    if not cfg.stream.root:
        return
    root = Path(cfg.stream.root).expanduser()
    root = root if root.is_absolute() else base / root
    if not root.is_dir():
        raise CLIError(
            f"stream.root: {root} is not a directory; point it at the folder holding the datasets "
            "(`moecl data list --root DIR` shows what it finds there)"
        )


def run_training(
    cfg: RunConfig,
    base: Path,
    out: Path,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    dry_run: bool = False,
) -> dict:
    import torch

    from moecl.data.tasks import build_stream, validate_stream
    from moecl.device import Placement

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    placement = Placement.of(cfg.device)  # a device this machine lacks is an error before anything is written
    check_data_root(cfg, base)
    stream = build_stream(cfg.stream, base_dir=base, seed=cfg.seed)
    validate_stream(stream)
    if dry_run:
        from moecl.plan import plan_run

        summary = stream.summary()
        print(json.dumps(summary, indent=2))
        print(plan_run(cfg, base, stream).format())
        return summary
    check_run_dir(out, cfg, resume, overwrite)
    from moecl.tracking import check_backends

    check_backends(cfg.logging)  # a missing optional package is one error line before anything loads

    from moecl.accel import is_main_process
    from moecl.engine import Engine, Interrupted
    from moecl.methods import build_learner
    from moecl.results import build_metrics, finish_run

    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    learner = build_learner(cfg, stream)
    main_process = is_main_process()  # under a launcher only rank 0 writes the run directory
    if main_process:
        prepare_run_dir(out, cfg, resume, overwrite)  # only now: a config the model cannot be built from writes nothing
    stop = {"flag": False}

    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        if stop["flag"] and signum == signal.SIGINT:  # second Ctrl-C: quit now; the last checkpoint stays valid
            raise KeyboardInterrupt
        stop["flag"] = True
        if not quiet:
            print("stopping after this step (checkpoint first); Ctrl-C again quits now", file=sys.stderr)

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.perf_counter()
    try:
        engine = Engine(learner, stream, cfg, out, quiet=quiet, stop_requested=lambda: stop["flag"], placement=placement)
        if not quiet:
            print(f"device: {placement.device}, data workers: {engine.data.workers}", file=sys.stderr)
        state = engine.run(resume=resume)
    except Interrupted as exc:
        raise CLIError(f"interrupted: {exc}") from exc
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    try:
        if not main_process:
            return build_metrics(cfg, stream, state, learner)
        metrics = finish_run(out, cfg, learner, stream, state, time.perf_counter() - start, engine.tracker)
    finally:
        engine.accel.close()  # multi-process: every process waits for the main one's outputs
    if not quiet:
        print(f"report: {out / 'report.md'}")
    return metrics


def with_device(cfg: RunConfig, device: str | None) -> RunConfig:
    """--device overrides the config's device setting (checked like a config value)."""
    return cfg if device is None else RunConfig.from_dict({**cfg.to_dict(), "device": device})


def cmd_train(args: argparse.Namespace) -> int:
    cfg, base = resolve_config(args.config, args.method, args.overrides)
    cfg = with_device(cfg, args.device)
    out = args.out or Path("runs") / (args.config.stem if args.config else "quickstart")
    run_training(cfg, base, out, args.resume, args.overwrite, args.quiet, args.dry_run)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    cfg, base = resolve_config(None, args.method, args.overrides)
    cfg = with_device(cfg, args.device)
    out = args.out or Path("runs") / "quickstart"
    metrics = run_training(cfg, base, out, args.resume, args.overwrite, args.quiet)
    print(
        f"quickstart done: Transfer {metrics['transfer']:.1f}  Average {metrics['average']:.1f}  "
        f"Last {metrics['last']:.1f}  ({metrics['time_s']:.0f}s) -> {out / 'report.md'}"
    )
    return 0


# --------------------------------------------------------------------------------------------------------------
# params / report / compare
# --------------------------------------------------------------------------------------------------------------
def cmd_params(args: argparse.Namespace) -> int:
    from moecl.data.tasks import stream_task_count
    from moecl.params import count_parameters

    cfg, _ = resolve_config(args.config, None, args.overrides)
    counts = count_parameters(cfg, stream_task_count(cfg.stream))
    if args.json:
        print(json.dumps(counts))
    else:
        for key in ("moe", "selector", "trainable", "total"):
            print(f"{key:>10}: {counts[key]:>13,}  ({counts[key] / 1e6:.1f}M)")
        for tower, n in counts["per_tower"].items():
            print(f"{'moe ' + tower:>10}: {n:>13,}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from moecl.plan import plan_run

    cfg, base = resolve_config(args.config, args.method, args.overrides)
    cfg = with_device(cfg, args.device)  # only the kind of device matters: a cuda plan works on any machine
    check_data_root(cfg, base)
    result = plan_run(cfg, base)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from moecl.results import rewrite_report

    if args.compare:
        return cmd_compare(argparse.Namespace(runs=[args.run, *args.compare], out=args.out))
    run = _existing_run(args.run)
    rewrite_report(run, load_yaml(run / "config.yaml"))
    print(f"report: {args.run / 'report.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from moecl.report import write_comparison

    runs = [_existing_run(r) for r in args.runs]
    out = args.out or Path("runs") / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    write_comparison(runs, out)
    print((out / "comparison.md").read_text())
    return 0


def _existing_run(path: Path) -> Path:
    if not (path / "metrics.json").is_file() or not (path / "config.yaml").is_file():
        raise CLIError(f"{path} is not a finished run directory (no metrics.json / config.yaml)")
    return path


# --------------------------------------------------------------------------------------------------------------
# eval / predict
# --------------------------------------------------------------------------------------------------------------
def load_run_config(run: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(load_yaml(run / "config.yaml"))
    except ConfigError as exc:
        raise CLIError(f"{run / 'config.yaml'}: {exc}") from exc


def cmd_eval(args: argparse.Namespace) -> int:
    from moecl.device import resolve_device
    from moecl.results import reevaluate

    run = _existing_run(args.run)
    cfg = with_device(load_run_config(run), args.device)
    resolve_device(cfg.device)  # one error line before anything is loaded
    result = reevaluate(run, cfg, task_agnostic=args.task_agnostic, quiet=args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from moecl.predict import Predictor, collect_images

    run = _existing_run(args.run)
    images = collect_images(args.images)
    cfg = with_device(load_run_config(run), args.device)
    predictor = Predictor.from_run(run, cfg)
    results = predictor.predict_paths(images, task=args.task, progress=not args.quiet)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['image']}\t{r['task'] or ZERO_SHOT_NAME}\t{r['label']}\t{r['score']:.3f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moecl.export import ExportError, export_run

    run = _existing_run(args.run)
    try:
        out = export_run(run, args.out, load_run_config(run), overwrite=args.overwrite)
    except ExportError as exc:  # bad arguments (an existing --out, an unfinished run), not a failure
        raise CLIError(str(exc)) from exc
    print(f"exported {run} -> {out} (load with Predictor.from_pretrained, upload with huggingface_hub)")
    return 0


# --------------------------------------------------------------------------------------------------------------
# data / bench
# --------------------------------------------------------------------------------------------------------------
def cmd_data(args: argparse.Namespace) -> int:
    from moecl.data import download as dl
    from moecl.data import registry
    from moecl.data.tasks import resolve_data_root

    root = resolve_data_root(str(args.root) if getattr(args, "root", None) else None)
    if args.data_command == "list":
        rows = [row.to_dict() for row in registry.list_datasets(root)]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"data root: {root}")
            for row in rows:
                head = f"{row['name']:<16} {row['num_classes'] or '':>5} classes  {row['display_name']}"
                if row["present"]:
                    print(f"{head}\n    found ({row['layout']}): {row['found']}")
                elif row["looked_in"]:
                    print(f"{head}\n    not found; looked in: {', '.join(row['looked_in'])}")
                else:
                    print(head)
        return 0
    if args.data_command == "download":
        path = dl.download(args.name, Path(args.root) if args.root else root, progress=not args.quiet)
        print(f"downloaded {args.name} -> {path}")
        return 0
    report = dl.verify(args.name, root)
    print(json.dumps(report, indent=2))
    return 0 if report.get("ok", False) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    if args.name == "dist":
        return cmd_bench_dist(args)
    if args.processes is not None or args.threads is not None:
        raise CLIError("--processes and --threads are options of `moecl bench dist`")
    from moecl import bench

    result = bench.run(args.name, tiny=args.tiny)
    print(json.dumps(result) if args.json else bench.format_result(args.name, result))
    return 0


def cmd_bench_dist(args: argparse.Namespace) -> int:
    from moecl import bench_dist

    try:
        processes = bench_dist.parse_processes(args.processes or "1,2")
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads {args.threads}: must be >= 1")
    result = bench_dist.run(tiny=args.tiny, processes=processes, threads=args.threads or 1)
    print(json.dumps(result) if args.json else bench_dist.format_result(result))
    return 0


# --------------------------------------------------------------------------------------------------------------
# argv
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def run_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, help="run directory")
        p.add_argument("--method", help="moe_adapters | zero_shot | finetune | lwf | wise_ft | zscl")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--device", help=DEVICE_HELP)
        p.add_argument("overrides", nargs="*", help="config overrides like optim.iterations=10")

    p = sub.add_parser("quickstart", help="offline default run on the bundled images (lite backbone)")
    run_flags(p)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("train", help="run any experiment config")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument(
        "--dry-run", action="store_true", help="build and validate the task stream, print its summary and its plan"
    )
    run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a finished run")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--task-agnostic", action="store_true", help="union label space of all learned tasks")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify images with automatic task selection")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--task", help="use this task instead of the selector")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="a finished run as a shareable model folder (adapters, selector, model card)")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the folder to write (uploadable with huggingface_hub)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("params", help="parameter counts from a config (no weights downloaded)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("plan", help="cost of a run from its config: passes, decodes, host memory, checkpoint disk")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--method", help="moe_adapters | zero_shot | finetune | lwf | wise_ft | zscl")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides like optim.iterations=10")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("data", help="datasets: list, download, verify")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("list")
    q.add_argument("--json", action="store_true")
    q.add_argument("--root", type=Path)
    q = dsub.add_parser("download")
    q.add_argument("name")
    q.add_argument("--root", type=Path)
    q.add_argument("--quiet", action="store_true")
    q = dsub.add_parser("verify")
    q.add_argument("name")
    q.add_argument("--root", type=Path)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("report", help="regenerate report.md and accuracy_matrix.png")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--compare", type=Path, nargs="*", help="other runs: write a comparison instead")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="one table + plot of Transfer/Average/Last for several runs")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="performance benchmarks (ratios measured in one run)")
    p.add_argument("name", choices=["moe", "step", "selector", "data", "memory", "dist"])  # bench.NAMES + bench_dist (tested)
    p.add_argument("--json", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny config only (fast)")
    p.add_argument("--processes", help="dist: process counts to launch, e.g. 1,2 (default)")
    p.add_argument("--threads", type=int, help="dist: torch threads per process (default 1)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    parser = build_parser()
    args = parser.parse_args(argv)
    from moecl.accel import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        return args.func(args)
    except (CLIError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, OSError, ImportError) as exc:
        if os.environ.get("MOECL_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training (which checkpoints and exits through CLIError)
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line, the traceback on request
        if os.environ.get("MOECL_DEBUG"):
            raise
        msg = f"internal error {type(exc).__name__}: {exc} (rerun with MOECL_DEBUG=1 for details)"
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
