"""Compare the task selectors (selector.kind: ddas, prototype) on the quickstart stream over several seeds.

Two phases, so every selector and seed is judged on the very same trained model:

1. record (once, cached): one quickstart training run through the real engine (MoE-Adapters + DDAS, selector seed
   0), with a learner that also records, for every test image and every evaluation row, whether each route the
   selector could pick (zero-shot, task 0..t-1) classifies it right, in the dataset's own label space (task-aware)
   and in the union of the learned tasks' classes (task-agnostic); and the selector inputs of every image (DDAS
   features, the frozen backbone's image embedding) of the reference set and every split.
2. simulate: for each selector kind and seed, the engine's selector protocol on those recorded inputs (reference
   fit, then after each task that task's fit, every test set routed), and from the routes the rates

     own-task rate         = share of test images of learned tasks routed to their own task,
     unseen -> zero-shot   = share of test images of datasets not learned yet routed to zero-shot

   (over every row after the first task, as metrics.json's "selector"), the accuracy matrices the routes give
   (task-aware and task-agnostic Transfer / Average / Last) and the selector's cost (parameters, state size, fit
   and selection time on this CPU).

The seed-0 DDAS simulation reproduces the recorded run's own DDAS rates and matrices (a check printed with the
table): the recorded routes are the engine's.

    .venv/bin/python scripts/measure_selectors.py                          # 5 seeds, both selectors
    .venv/bin/python scripts/measure_selectors.py --kinds prototype --seeds 0 --set prototype_quantile=0.97
    .venv/bin/python scripts/measure_selectors.py --json > selectors.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from measure_ddas import _parse_set  # the same --set syntax (scripts/ is on sys.path when a script runs)
from safetensors.torch import load_file, save_file

from moecl.branches import ZERO_SHOT
from moecl.config import MIB, RunConfig, SelectorConfig, quickstart_config, to_dict
from moecl.methods.moe_adapters import MoEAdaptersLearner
from moecl.selector.base import SELECTORS, build_selector, selector_class
from moecl.selector.features import build_feature_extractor

REFERENCE = "reference"
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# 1. record
# ----------------------------------------------------------------------------------------------------------------
class RecordingLearner(MoEAdaptersLearner):
    """MoE-Adapters that also records selector inputs by image key and, per evaluation row, every route's
    correctness for every test image (the run itself is unchanged: predict returns the parent's prediction)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the features each selector kind reads (DDAS: squashed into (0, 1); prototype: as they are), by image key
        self.extractors = {
            kind: build_feature_extractor(
                self.cfg.selector.features, self.model.backbone, squash=selector_class(kind).SQUASHED_FEATURES
            )
            for kind in SELECTORS
        }
        self.seen: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in SELECTORS}
        # (learned, key) -> (routes,) bool: aware / agnostic correctness of route ZERO_SHOT, 0, ..., learned-1
        self.aware: dict[tuple[int, str], torch.Tensor] = {}
        self.agnostic: dict[tuple[int, str], torch.Tensor] = {}

    @torch.no_grad()
    def selector_features(self, batch):
        features = super().selector_features(batch)
        with torch.autocast(self.device.type, enabled=False), self.model.task(None):
            for kind, extractor in self.extractors.items():
                for key, f in zip(batch.keys, extractor.of(batch).cpu(), strict=True):
                    self.seen[kind][key] = f.clone()
        return features

    @torch.no_grad()
    def predict(self, batch, stream, learned):
        prediction = super().predict(batch, stream, learned)
        if learned == 0:
            return prediction
        self.selector_features(batch)  # every test image's inputs (the parent may have reused kept ones)
        dataset = batch.dataset
        key, classnames, templates = self.label_space(stream, dataset, learned)
        union_tasks, offset = self.union_space(stream, dataset, learned)
        aware, agnostic = [], []
        for route in [None, *range(learned)]:
            image = self.model.image_suffix(batch.prefix, task=route)
            logits = image @ self.eval_classifier(classnames, templates, key, route).t()
            union = image @ self.union_classifier(stream, union_tasks, route).t()
            aware.append(logits.argmax(-1).cpu() == batch.labels.cpu())
            agnostic.append(union.argmax(-1).cpu() == batch.labels.cpu() + offset)
        aware, agnostic = torch.stack(aware, 1), torch.stack(agnostic, 1)
        for n, k in enumerate(batch.keys):
            self.aware[(learned, k)], self.agnostic[(learned, k)] = aware[n], agnostic[n]
        return prediction


def record(cfg: RunConfig, run_dir: Path) -> dict:
    """One training run of `cfg` recording what the simulation needs; returns the tensors and the run's metrics."""
    from moecl.backbone import build_backbone
    from moecl.data.tasks import build_stream
    from moecl.engine import Engine

    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    stream = build_stream(cfg.stream, seed=cfg.seed)
    learner = RecordingLearner.from_config(build_backbone(cfg.backbone), cfg, stream)
    t0 = time.perf_counter()
    state = Engine(learner, stream, cfg, run_dir, quiet=False).run()
    wall = time.perf_counter() - t0
    tensors: dict[str, torch.Tensor] = {}
    splits = {REFERENCE: learner._reference}
    for task in stream.tasks:
        splits[f"{task.name}/train"], splits[f"{task.name}/test"] = task.train, task.test
        tensors[f"labels/{task.name}/train"] = torch.tensor(task.train.labels, dtype=torch.long)
    for name, ds in splits.items():
        keys = [ds.key(i) for i in range(len(ds))]
        for kind, seen in learner.seen.items():
            missing = [k for k in keys if k not in seen]
            if missing:
                raise RuntimeError(f"{name}: {len(missing)} images never reached the selector (e.g. {missing[0]})")
            tensors[f"features/{kind}/{name}"] = torch.stack([seen[k] for k in keys])
        if name.endswith("/test"):
            for learned in range(1, len(stream.tasks) + 1):
                tensors[f"aware/{learned}/{name}"] = torch.stack([learner.aware[(learned, k)] for k in keys])
                tensors[f"agnostic/{learned}/{name}"] = torch.stack([learner.agnostic[(learned, k)] for k in keys])
    meta = {
        "version": CACHE_VERSION,
        "tasks": [t.name for t in stream.tasks],
        "zero_shot": state.matrix.zero_shot,
        "matrix": state.matrix.to_dict(),
        "agnostic": state.agnostic.to_dict(),
        "selector": learner.metrics(stream).get("selector", {}),
        "wall_s": round(wall, 1),
    }
    return {"tensors": tensors, "meta": meta}


def load_or_record(cache: Path, cfg: RunConfig) -> tuple[dict[str, torch.Tensor], dict]:
    tensors_path, meta_path = cache / "recorded.safetensors", cache / "recorded.json"
    if tensors_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == CACHE_VERSION:
            tensors = load_file(str(tensors_path))
            return tensors, meta
    print(f"recording one quickstart run (cached in {cache})", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    out = record(cfg, cache / "run")
    bools = {k: v.to(torch.uint8) if v.dtype == torch.bool else v.contiguous() for k, v in out["tensors"].items()}
    save_file(bools, str(tensors_path))
    meta_path.write_text(json.dumps(out["meta"], indent=1))
    return load_file(str(tensors_path)), out["meta"]


# ----------------------------------------------------------------------------------------------------------------
# 2. simulate
# ----------------------------------------------------------------------------------------------------------------
def route_column(routes: torch.Tensor) -> torch.Tensor:
    """Column of the recorded correctness tables for each route: 0 = zero-shot, t + 1 = task t."""
    return torch.where(routes == ZERO_SHOT, torch.zeros_like(routes), routes + 1)


def score_routes(routes: dict[tuple[int, int], torch.Tensor], tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Rates and matrices of given routes {(learned, dataset): (N,) routes of that test set after `learned` tasks}."""
    from moecl.metrics import AccuracyMatrix

    names = meta["tasks"]
    views = {"aware": AccuracyMatrix(names), "agnostic": AccuracyMatrix(names), "routed": AccuracyMatrix(names)}
    for view in views.values():
        for j, v in enumerate(meta["zero_shot"]):
            view.set_zero_shot(j, v)
    seen = [0, 0]
    unseen = [0, 0]
    for (learned, j), chosen in routes.items():
        col = route_column(chosen).unsqueeze(1)
        aware = tensors[f"aware/{learned}/{names[j]}/test"].bool()
        agnostic = tensors[f"agnostic/{learned}/{names[j]}/test"].bool()
        right = {
            "aware": aware.gather(1, col).squeeze(1),
            "agnostic": agnostic.gather(1, col).squeeze(1),
            # the routed task's classes only (zero-shot: the whole union): right task and right class
            "routed": torch.where(chosen == ZERO_SHOT, agnostic[:, 0], (chosen == j) & aware.gather(1, col).squeeze(1)),
        }
        for view, matrix in views.items():
            matrix.set(learned - 1, j, 100.0 * float(right[view].float().mean()))
        target = j if j < learned else ZERO_SHOT
        counts = seen if j < learned else unseen
        counts[0] += int((chosen == target).sum())
        counts[1] += len(chosen)
    out = {"own_task": seen[0] / seen[1], "unseen_zero_shot": unseen[0] / unseen[1] if unseen[1] else None}
    for view, matrix in views.items():
        out[view] = {"transfer": matrix.transfer(), "average": matrix.average(), "last": matrix.last()}
    return out


def oracle_routes(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    """Every image to its own task once learned, else zero-shot: what a perfect selector would do."""
    names = meta["tasks"]
    out = {}
    for learned in range(1, len(names) + 1):
        for j, name in enumerate(names):
            n = len(tensors[f"aware/{learned}/{name}/test"])
            out[(learned, j)] = torch.full((n,), j if j < learned else ZERO_SHOT, dtype=torch.long)
    return out


def simulate(kind: str, cfg: SelectorConfig, seed: int, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The engine's selector protocol for one selector on the recorded inputs: its routes' scores and its cost."""
    names = meta["tasks"]
    feats = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"features/{kind}/")}
    selector = build_selector(dataclasses.replace(cfg, kind=kind), feats[REFERENCE].shape[1], seed=seed)
    fit_s = select_s = 0.0
    selected = 0
    t0 = time.perf_counter()
    if selector.USES_REFERENCE and cfg.reference:
        selector.fit_reference(feats[REFERENCE])
    fit_s += time.perf_counter() - t0
    routes = {}
    for learned, name in enumerate(names, start=1):
        t0 = time.perf_counter()
        selector.fit_task(feats[f"{name}/train"], labels=tensors[f"labels/{name}/train"])
        fit_s += time.perf_counter() - t0
        for j, other in enumerate(names):
            test = feats[f"{other}/test"]
            t0 = time.perf_counter()
            routes[(learned, j)] = selector.select(test)
            select_s += time.perf_counter() - t0
            selected += len(test)
    state = selector.state_dict()
    out = score_routes(routes, tensors, meta)
    out["cost"] = {
        "parameters": sum(p.numel() for p in selector.parameters()),
        "stored_values": sum(v.numel() for v in state.values()),
        "stored_mib": sum(v.numel() * v.element_size() for v in state.values()) / MIB,
        "fit_s": fit_s,
        "select_us_per_image": 1e6 * select_s / selected,
    }
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


COLUMNS = [
    ("own-task", ("own_task",), 3),
    ("unseen->ZS", ("unseen_zero_shot",), 3),
    ("aware T", ("aware", "transfer"), 1),
    ("aware A", ("aware", "average"), 1),
    ("aware L", ("aware", "last"), 1),
    ("agnostic T", ("routed", "transfer"), 1),
    ("agnostic A", ("routed", "average"), 1),
    ("agnostic L", ("routed", "last"), 1),
    ("union T", ("agnostic", "transfer"), 1),
    ("union A", ("agnostic", "average"), 1),
    ("union L", ("agnostic", "last"), 1),
]
COST = [
    ("parameters", ("cost", "parameters"), 0),
    ("stored MiB", ("cost", "stored_mib"), 2),
    ("fit s", ("cost", "fit_s"), 2),
    ("select us/img", ("cost", "select_us_per_image"), 1),
]


def _get(result: dict, path: tuple[str, ...]) -> float:
    for key in path:
        result = result[key]
    return float(result)


def table(rows: dict[str, list[dict]]) -> str:
    """Markdown: per selector the mean (± std over seeds) of every column."""
    columns = COLUMNS + COST
    lines = ["| selector | seeds | " + " | ".join(c[0] for c in columns) + " |"]
    lines.append("|" + "---|" * (len(columns) + 2))
    for name, runs in rows.items():
        cells = []
        for _, path, digits in columns:
            if path[0] == "cost" and "cost" not in runs[0]:
                cells.append("–")
                continue
            mean, std = _stats([_get(r, path) for r in runs])
            cells.append(f"{mean:,.{digits}f}" + (f" ± {std:.{digits}f}" if std and path[0] != "cost" else ""))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=list(SELECTORS), choices=list(SELECTORS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="selector seeds (the engine uses 0)")
    p.add_argument("--set", nargs="*", default=[], help="SelectorConfig overrides, e.g. prototype_quantile=0.97")
    p.add_argument("--cache", default="runs/selector_record", help="folder of the recorded run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print every seed's results as JSON instead of the table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = quickstart_config()
    tensors, meta = load_or_record(Path(args.cache), cfg)
    sel = dataclasses.replace(cfg.selector, **_parse_set(args.set))
    results = {kind: [simulate(kind, sel, seed, tensors, meta) for seed in args.seeds] for kind in args.kinds}
    oracle = score_routes(oracle_routes(meta, tensors), tensors, meta)
    recorded = meta["selector"]
    if "ddas" in results and 0 in args.seeds:  # the recorded run's own selector: the simulation must reproduce it
        again = results["ddas"][args.seeds.index(0)]
        check = {
            "recorded_run": {
                "own_task": recorded["task_selection_accuracy"],
                "unseen_zero_shot": recorded["zero_shot_rate_unseen"],
                "aware_last": meta["matrix"]["last"],
                "agnostic_last": meta["agnostic"]["last"],
            },
            "simulated_ddas_seed0": {
                "own_task": again["own_task"],
                "unseen_zero_shot": again["unseen_zero_shot"],
                "aware_last": round(again["aware"]["last"], 4),
                # the run's own task-agnostic view: its selector.agnostic_classes
                "agnostic_last": round(again["routed" if cfg.selector.agnostic_classes == "routed" else "agnostic"]["last"], 4),
            },
        }
    else:
        check = None
    if args.json:
        print(json.dumps({"selector": to_dict(sel), "seeds": args.seeds, "results": results, "oracle": oracle,
                          "check": check}, indent=1))
        return
    print(table({**results, "oracle (true task)": [oracle]}))
    print()
    print("own-task / unseen->ZS: rates over every row after the first task; aware: the dataset's own classes; "
          "agnostic: the routed task's classes (selector.agnostic_classes routed); union: every learned class "
          "(agnostic_classes union). T/A/L = Transfer / Average / Last.")
    if check:
        print(f"check (recorded engine run vs simulated DDAS seed 0): {json.dumps(check)}")


if __name__ == "__main__":
    main()
