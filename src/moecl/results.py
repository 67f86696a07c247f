"""Turning a finished engine run into the run directory's contract files (metrics.json, report.md, heat map)."""

from __future__ import annotations

import json
from pathlib import Path

from moecl.checkpoint import atomic_write_json
from moecl.config import RunConfig
from moecl.data.tasks import TaskStream
from moecl.params import parameter_counts
from moecl.report import write_report
from moecl.runstate import RunState


def parameter_summary(learner) -> dict[str, int]:
    """The learner's parameters as trained (all tasks' routers and autoencoders): the counter `moecl params` uses."""
    return parameter_counts(learner.parameter_parts())


def build_metrics(cfg: RunConfig, stream: TaskStream, state: RunState, learner) -> dict:
    m = state.matrix.to_dict()
    metrics = {
        "method": cfg.method,
        "backbone": learner.backbone.label,
        **{k: m[k] for k in ("tasks", "eval_datasets", "zero_shot", "accuracy_matrix")},
        "transfer": m["transfer"],
        "average": m["average"],
        "last": m["last"],
    }
    if "seen_accuracy" in m:
        metrics["seen_accuracy"] = m["seen_accuracy"]
    if state.agnostic is not None:
        a = state.agnostic.to_dict()
        metrics["task_agnostic"] = {
            k: a[k] for k in ("zero_shot", "accuracy_matrix", "transfer", "average", "last")
        }
    metrics.update(learner.metrics(stream))  # e.g. MoE-Adapters' DDAS "selector" rates
    metrics["params"] = parameter_summary(learner)
    metrics["time_s"] = round(sum(state.timing.values()), 2)
    if state.evaluation:
        metrics["evaluation"] = state.evaluation_cost()
    if len(state.decoded) > 1:  # a multi-process run: each process decodes about 1/N of the images
        metrics["decoded_images_per_process"] = state.decoded
    return metrics


def finish_run(
    out: Path, cfg: RunConfig, learner, stream: TaskStream, state: RunState, elapsed: float, tracker=None
) -> dict:
    """Write the contract files of a finished run; adapters/selector/stream.json make it usable by `predict`.
    `tracker` (the engine's, moecl.tracking) gets the final matrix and summary, and is closed."""
    from moecl.predict import TaskInfo, save_stream_info

    save_stream_info(out / "stream.json", [TaskInfo(t.name, t.classnames, t.templates) for t in stream.tasks])
    learner.save_outputs(out)
    metrics = build_metrics(cfg, stream, state, learner)
    extra = {"timing": state.timing, **learner.report_extra(stream), "stream": stream.summary()}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "checkpoints" / "report_extra.json", extra)
    write_report(out, metrics, cfg.to_dict(), extra)
    if tracker is not None:
        from moecl.tracking import summary_of

        numbers = {f"selector/{k}": v for k, v in metrics.get("selector", {}).items()}
        tracker.finish(state.matrix, summary_of(state.matrix, {**numbers, "time_s": metrics["time_s"]}))
    return metrics


def rewrite_report(run: Path, config: dict) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    extra_path = run / "checkpoints" / "report_extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    write_report(run, metrics, config, extra)


def reevaluate(run: Path, cfg: RunConfig, task_agnostic: bool = False, quiet: bool = False, base: Path | None = None):
    """Re-evaluate a finished run from its last checkpoint: the final row is recomputed (task-aware and, for MTIL
    streams, task-agnostic); earlier rows need the models after each task and come from the training-time
    evaluation stored with the run. metrics.json is updated atomically."""
    from moecl.data.tasks import build_stream
    from moecl.engine import Engine
    from moecl.methods import build_learner

    stream = build_stream(cfg.stream, base_dir=base, seed=cfg.seed)
    learner = build_learner(cfg, stream)
    engine = Engine(learner, stream, cfg, run, quiet=quiet)
    loaded = engine.load_checkpoint()
    if loaded is None:
        raise FileNotFoundError(f"{run / 'checkpoints'} has no valid checkpoint to evaluate")
    state = loaded[0]
    if state.task < len(stream.tasks):
        raise ValueError(f"{run} is not finished ({state.task}/{len(stream.tasks)} tasks); resume it first")
    final = len(stream.tasks) - 1
    before = list(state.matrix.row(final))
    engine.evaluate(state, learned=len(stream.tasks))
    metrics = json.loads((run / "metrics.json").read_text())
    fresh = build_metrics(cfg, stream, state, learner)
    fresh["time_s"] = metrics.get("time_s", fresh["time_s"])
    result = {
        "final_row": dict(zip(state.matrix.eval_datasets, state.matrix.row(final), strict=True)),
        "final_row_at_training": dict(zip(state.matrix.eval_datasets, before, strict=True)),
        "transfer": fresh["transfer"],
        "average": fresh["average"],
        "last": fresh["last"],
    }
    if task_agnostic:
        if "task_agnostic" not in fresh:
            raise ValueError("task-agnostic evaluation needs an MTIL-style stream of a moe_adapters run")
        metrics["task_agnostic"] = fresh["task_agnostic"]
        result["task_agnostic"] = fresh["task_agnostic"]
        atomic_write_json(run / "metrics.json", metrics)
    return result
