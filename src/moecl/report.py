"""Human-readable outputs of a run: report.md + accuracy_matrix.png, and comparison.md + comparison.png of runs.

Inputs are the run directory's contract data (metrics.json as a dict, the resolved config as a dict, and optional
extras such as per-phase timing and DDAS confusion counts), so `moecl report` can regenerate everything from files.
matplotlib is imported lazily (Agg canvas, no pyplot state) so importing this module stays cheap.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moecl.backbone import backbone_class
from moecl.backbone.lite import LABEL as LITE_LABEL
from moecl.branches import ZERO_SHOT_NAME
from moecl.checkpoint import atomic_write_bytes, atomic_write_text
from moecl.config import RunConfig
from moecl.metrics import AccuracyMatrix
from moecl.selector.base import selector_class


# --------------------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------------------
def _num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(fraction: Any) -> str:
    return "–" if fraction is None else f"{100.0 * float(fraction):.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _num(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flatten(value, name + ".")
        elif isinstance(value, (list, tuple)):
            out.append((name, ", ".join(_num(v) for v in value)))
        else:
            out.append((name, value))
    return out


def backbone_label(metrics: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """metrics["backbone"] when the run recorded it, else derived from the config."""
    if metrics.get("backbone"):
        return str(metrics["backbone"])
    bb = config.get("backbone") or {}
    if bb.get("name") == "lite":
        return LITE_LABEL
    if bb.get("name") == "clip" or bb.get("model"):
        return f"CLIP {bb.get('model', 'openai/clip-vit-base-patch16')}"
    return str(bb.get("name", "unknown"))


def run_config(metrics: Mapping[str, Any], config: Mapping[str, Any]) -> RunConfig:
    """A finished run's config, typed (a config without a method takes the one metrics.json records)."""
    data = dict(config)
    if "method" not in data and metrics.get("method"):
        data["method"] = metrics["method"]
    return RunConfig.from_dict(data)


def _on_clip(cfg: RunConfig) -> bool:
    return backbone_class(cfg.backbone.name).is_clip


# --------------------------------------------------------------------------------------------------------------
# report.md sections
# --------------------------------------------------------------------------------------------------------------
def _config_section(metrics: Mapping[str, Any], config: Mapping[str, Any], label: str) -> list[str]:
    stream = config.get("stream") or {}
    optim = config.get("optim") or {}
    moe = config.get("moe") or {}
    selector = config.get("selector") or {}
    tasks = metrics.get("tasks") or []
    kind = stream.get("kind", "mtil")
    shots = stream.get("shots")
    rows: list[tuple[str, Any]] = [
        ("method", metrics.get("method") or config.get("method", "?")),
        ("backbone", label),
        (
            "stream",
            f"{stream.get('name', '?')} ({kind}{f', {shots}-shot' if shots else ''}), {len(tasks)} tasks: "
            + ", ".join(tasks),
        ),
        ("seed", config.get("seed", "–")),
    ]
    if optim:
        length = (
            f"{optim['epochs']} epochs" if optim.get("epochs") is not None else f"{optim.get('iterations')} iterations"
        )
        per_task = optim.get("lr_per_task") or {}
        lr = f"lr {optim.get('lr', '?')}" + (
            " (per task: " + ", ".join(f"{k} {v}" for k, v in per_task.items()) + ")" if per_task else ""
        )
        rows.append(
            (
                "training",
                f"{length} per task, batch {optim.get('batch_size')}, {lr}, warmup {optim.get('warmup_steps')}, "
                f"label smoothing {optim.get('label_smoothing')}",
            )
        )
    cfg = run_config(metrics, config)
    if moe and cfg.uses_adapters:
        rows.append(
            (
                "MoE",
                f"{moe.get('num_experts')} experts, top-{moe.get('top_k')}, bottleneck {moe.get('bottleneck')}, "
                f"towers {'+'.join(moe.get('towers') or [])}, {moe.get('freeze_per_task')} frozen per task"
                + (", one router" if moe.get("single_router") else ", one router per task"),
            )
        )
    if selector and cfg.uses_adapters:
        rows.append(
            (
                "selector",
                _selector_summary(selector) if selector.get("enabled", True) else "off (task identity given)",
            )
        )
    if metrics.get("time_s") is not None:
        rows.append(("wall time", f"{_num(float(metrics['time_s']))} s"))
    lines = ["## Configuration", ""] + _table(["setting", "value"], [(k, _num(v)) for k, v in rows])
    if not _on_clip(cfg):
        lines += [
            "Numbers come from the small offline backbone, not CLIP ViT-B/16: they show the method working, "
            "not the paper's results.",
            "",
        ]
    return lines


def _matrix_section(matrix: AccuracyMatrix) -> list[str]:
    lines = ["## Accuracy matrix (%)", ""]
    if matrix.class_incremental:
        lines.append("Row = after training step i, column = classes of step j; last column = all classes seen so far.")
    else:
        lines.append("Row = after training task i (zero-shot = untouched model), column = eval dataset j.")
    lines += ["", matrix.to_markdown(), "![accuracy matrix](accuracy_matrix.png)", ""]
    return lines


def _selector_section(
    selector: Mapping[str, Any] | None,
    confusion: Mapping[str, Mapping[str, int]] | None,
    tasks: Sequence[str],
    unseen: Mapping[str, Mapping[str, int]] | None = None,
    cost: Mapping[str, Any] | None = None,
    name: str = "DDAS",
) -> list[str]:
    if not selector and not confusion:
        return []
    lines = [f"## Task selection ({name})", ""]
    if selector:
        rows = []
        named = {
            "task_selection_accuracy": "learned tasks routed to their own task",
            "zero_shot_rate_unseen": "not-yet-learned tasks sent to zero-shot",
        }
        for key, value in selector.items():
            text = _pct(value) if key in named and isinstance(value, (int, float)) else _num(value, 3)
            rows.append((named.get(key, key), text))
        lines += _table(["statistic", "value"], rows)
    if confusion:
        lines += ["Routing after the final task (rows: true dataset, columns: chosen branch):", ""]
        lines += _routing_table("dataset", confusion, tasks)
    if unseen:
        lines += ["Datasets not learned yet at each checkpoint (the right branch is zero-shot):", ""]
        lines += _routing_table("dataset, checkpoint", unseen, tasks)
    if cost:
        lines += _selector_cost(cost)
    return lines


def _selector_cost(cost: Mapping[str, Any]) -> list[str]:
    per_image = cost.get("select_us_per_image")
    rows = [
        ("parameters", _num(cost.get("parameters"))),
        ("saved state", _bytes(cost.get("state_bytes"))),
        ("fit time (every task, and the reference if it has one)", f"{float(cost.get('fit_s') or 0):,.2f} s"),
        ("selection time per test image (its selector features included)", "–" if per_image is None else f"{per_image:,.1f} µs"),
        ("test images selected (every row after the first task)", _num(cost.get("selected_images"))),
    ]
    return ["The selector's own cost (times on this run's main process):", ""] + _table(["", "value"], rows)


def _bytes(n: Any) -> str:
    from moecl.plan import human_bytes  # (here: plan imports the engine, which writes reports)

    return human_bytes(n) if isinstance(n, (int, float)) else "–"


def _routing_table(label: str, counts_by_row: Mapping[str, Mapping[str, int]], tasks: Sequence[str]) -> list[str]:
    columns = [t for t in tasks if any(t in counts for counts in counts_by_row.values())]
    for counts in counts_by_row.values():
        columns += [c for c in counts if c not in columns]
    columns.sort(key=lambda c: c == ZERO_SHOT_NAME)  # stable: tasks in training order, zero-shot last
    rows = [(name, *(counts.get(c, 0) for c in columns)) for name, counts in counts_by_row.items()]
    return _table([label, *columns], rows)


def _selector_name(selector: Mapping[str, Any]) -> str:
    """The selector.kind's name (config.json written before kinds existed: DDAS)."""
    return selector_class(selector.get("kind", "ddas")).NAME


def _selector_summary(selector: Mapping[str, Any]) -> str:
    if selector.get("kind", "ddas") == "prototype":
        return (
            f"prototype ({selector.get('features')} features, class prototypes, threshold: held-out quantile "
            f"{selector.get('prototype_quantile')})"
        )
    return (
        f"DDAS ({selector.get('features')} features, hidden {selector.get('hidden')}, "
        f"threshold {selector.get('threshold')}, reference {selector.get('reference')})"
    )


def _task_agnostic_section(data: Any, metrics: Mapping[str, Any], selector: Mapping[str, Any]) -> list[str]:
    union = (
        "the classes of all tasks learned so far (plus its own dataset's classes while that one is not learned yet)"
    )
    if not selector.get("enabled", True):
        text = f"Routes follow the given task identity (selector off); each image is classified among {union}."
    else:
        name = _selector_name(selector)
        name = "the " + name if name != "DDAS" else name
        if selector.get("agnostic_classes", "routed") == "routed":
            how = f"an image it sends to a task is classified among that task's classes, one sent to zero-shot among {union}"
        else:
            how = f"each image is classified among {union}"
        text = f"Task identity unknown at test time: {name} picks the branch per image and {how}."
    lines = ["## Task-agnostic evaluation", "", text, ""]
    if isinstance(data, Mapping) and "accuracy_matrix" in data:
        # metrics.json keeps the rows and columns once, at the top level
        named = {"tasks": metrics.get("tasks"), "eval_datasets": metrics.get("eval_datasets"), **data}
        if named["tasks"]:
            return lines + [AccuracyMatrix.from_dict(named).to_markdown()]
    if isinstance(data, Mapping):
        return lines + _table(["metric", "value"], [(k, _num(v)) for k, v in _flatten(data)])
    return lines + [_num(data), ""]


def _cost_section(
    params: Mapping[str, Any] | None, timing: Mapping[str, Any] | None, evaluation: Mapping[str, Any] | None = None
) -> list[str]:
    if not params and not timing and not evaluation:
        return []
    lines = ["## Cost", ""]
    if params:
        rows = []
        for key, value in _flatten(params):
            millions = f"{value / 1e6:.2f}M" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            rows.append((key, _num(value), millions))
        lines += ["Parameters:", ""] + _table(["component", "count", "millions"], rows)
    if timing:
        total = sum(float(v) for v in timing.values() if isinstance(v, (int, float)))
        rows = [(k, _num(float(v)), _pct(float(v) / total) if total else "–") for k, v in timing.items()]
        rows.append(("total", _num(total), "100.0%" if total else "–"))
        lines += ["Time per phase (s):", ""] + _table(["phase", "seconds", "share"], rows)
    if evaluation:
        images = int(evaluation.get("images", 0))
        labels = {"images": "images predicted", "forwards": "image forwards run", "reused": "forwards reused"}
        rows = [
            (labels.get(k, k), _num(v), _pct(v / images) if images else "–") for k, v in evaluation.items()
        ]
        lines += [
            "Evaluation over every row (reused: images routed to zero-shot, whose embedding the zero-shot row had "
            "computed):",
            "",
        ] + _table(["", "count", "share of images"], rows)
    return lines


def _extra_sections(extra: Mapping[str, Any]) -> list[str]:
    stream = extra.get("stream")
    if not stream:
        return []
    lines = ["## Stream", ""]
    if isinstance(stream, Mapping):
        tasks = stream.get("tasks")
        if isinstance(tasks, list) and tasks and all(isinstance(t, Mapping) for t in tasks):
            rest = {k: v for k, v in stream.items() if k != "tasks" and v is not None}
            lines += _table(["item", "value"], [(k, _num(v)) for k, v in _flatten(rest)])
            return lines + _extra_sections({"stream": tasks})[2:]
        return lines + _table(["item", "value"], [(k, _num(v)) for k, v in _flatten(stream)])
    if isinstance(stream, list) and all(isinstance(s, Mapping) for s in stream):
        keys: list[str] = []
        for s in stream:
            keys += [k for k, v in s.items() if k not in keys and not isinstance(v, (Mapping, list))]
        return lines + _table(keys, [[_num(s.get(k)) for k in keys] for s in stream])
    return lines + [_num(stream), ""]


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def heatmap_png(matrix: AccuracyMatrix, title: str = "") -> bytes:
    """Rows: zero-shot + after each task; columns: eval datasets; cells annotated; missing cells left blank."""
    import numpy as np
    from matplotlib.figure import Figure

    values = [matrix.zero_shot] + [matrix.row(i) for i in range(matrix.num_tasks)]
    data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float))
    n_rows, n_cols = data.shape
    # Cells shrink for long CIL streams (50 steps) so the image stays a sensible size; values are written into
    # the cells while they are still legible.
    cell_w, cell_h = (0.75, 0.45) if n_cols <= 20 else (0.3, 0.25)
    fig = Figure(figsize=(max(4.0, 1.6 + cell_w * n_cols), max(2.5, 1.2 + cell_h * n_rows)))
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    ticks_font = 8 if n_cols <= 20 else 5
    ax.set_xticks(range(n_cols), matrix.eval_datasets, rotation=45, ha="right", fontsize=ticks_font)
    ax.set_yticks(range(n_rows), [ZERO_SHOT_NAME, *matrix.tasks], fontsize=ticks_font)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training")
    if n_cols <= 20:
        small = n_rows * n_cols > 200
        for i in range(n_rows):
            for j in range(n_cols):
                if data.mask is np.ma.nomask or not data.mask[i, j]:
                    v = float(data[i, j])
                    text = f"{v:.0f}" if small else f"{v:.1f}"
                    color = "black" if v > 60 else "white"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7 if small else 8, color=color)
    fig.colorbar(image, ax=ax, label="top-1 accuracy (%)")
    if title:
        ax.set_title(title)
    return _png(fig)


def comparison_png(labels: Sequence[str], values: Sequence[Sequence[float | None]]) -> bytes:
    """Grouped bars: one group per run, bars Transfer / Average / Last (missing values not drawn)."""
    from matplotlib.figure import Figure

    names = ("Transfer", "Average", "Last")
    width = 0.8 / len(names)
    fig = Figure(figsize=(max(4.5, 1.5 + 1.4 * len(labels)), 3.6))
    ax = fig.add_subplot()
    for k, name in enumerate(names):
        xs = [i + (k - 1) * width for i, row in enumerate(values) if row[k] is not None]
        ys = [row[k] for row in values if row[k] is not None]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(
        range(len(labels)), labels, rotation=20 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center"
    )
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(ncols=3, loc="upper center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    return _png(fig)


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------
def render_report(metrics: Mapping[str, Any], config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """The report.md text (without writing anything)."""
    extra = extra or {}
    matrix = AccuracyMatrix.from_dict(metrics)
    label = backbone_label(metrics, config)
    method = metrics.get("method") or config.get("method", "?")
    stream = (config.get("stream") or {}).get("name", "")
    lines = [f"# moecl run: {method}{f' on {stream}' if stream else ''}", ""]
    lines += _config_section(metrics, config, label)
    lines += _matrix_section(matrix)
    selector_cfg = config.get("selector") or {}
    lines += _selector_section(
        metrics.get("selector"),
        extra.get("selector_confusion"),
        matrix.tasks,
        extra.get("selector_unseen_routing"),
        extra.get("selector_cost"),
        _selector_name(selector_cfg),
    )
    if metrics.get("task_agnostic") is not None:
        lines += _task_agnostic_section(metrics["task_agnostic"], metrics, config.get("selector") or {})
    lines += _cost_section(metrics.get("params"), extra.get("timing"), metrics.get("evaluation"))
    lines += _extra_sections(extra)
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    run_dir: str | Path, metrics: Mapping[str, Any], config: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write run_dir/report.md and run_dir/accuracy_matrix.png (atomically); returns both paths."""
    run_dir = Path(run_dir)
    text = render_report(metrics, config, extra)
    matrix = AccuracyMatrix.from_dict(metrics)
    title = f"{metrics.get('method') or config.get('method', '')} — {backbone_label(metrics, config)}"
    png = heatmap_png(matrix, title)
    atomic_write_bytes(run_dir / "accuracy_matrix.png", png)
    atomic_write_text(run_dir / "report.md", text)
    return run_dir / "report.md", run_dir / "accuracy_matrix.png"


def _read_run(run_dir: Path) -> tuple[dict, dict]:
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished run directory") from exc
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    config: dict = {}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        import yaml

        try:
            config = yaml.safe_load(cfg_path.read_text("utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{cfg_path} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    return metrics, config


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{p.resolve().parent.name}/{p.resolve().name}" for p in run_dirs]


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Write out/comparison.md (method, backbone, Transfer, Average, Last per run) and out/comparison.png."""
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    out = Path(out)
    labels = _run_labels(run_dirs)
    rows, values, on_clip = [], [], []
    for label, run in zip(labels, run_dirs, strict=True):
        metrics, config = _read_run(run)
        tal = [metrics.get("transfer"), metrics.get("average"), metrics.get("last")]
        tal = [None if v is None else float(v) for v in tal]
        values.append(tal)
        stream = (config.get("stream") or {}).get("name", "–")
        rows.append(
            (label, metrics.get("method") or config.get("method", "?"), backbone_label(metrics, config), stream, *tal)
        )
        on_clip.append(_on_clip(run_config(metrics, config)))
    lines = ["# moecl comparison", ""]
    lines += _table(["run", "method", "backbone", "stream", "Transfer", "Average", "Last"], rows)
    if not all(on_clip):
        lines += ["Runs on the lite backbone are not comparable with CLIP numbers.", ""]
    lines += ["![comparison](comparison.png)", ""]
    png = comparison_png(labels, values)
    atomic_write_bytes(out / "comparison.png", png)
    atomic_write_text(out / "comparison.md", "\n".join(lines))
    return out / "comparison.md", out / "comparison.png"
