"""One process of tests/test_distributed.py's classifier launch: the evaluation classifiers of a tiny MoE learner
(two tasks, every route), built by `Learner.build_classifiers` with the prompts shared out among the processes,
against the ones `eval_classifier` builds alone in this process. Writes rank<R>.json into the job directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from moecl.accel import TrainingAccelerator
from moecl.config import RunConfig
from moecl.data.tasks import build_stream
from moecl.methods import build_learner
from moecl.methods.base import ClassifierRequest


def main(job: Path) -> None:
    cfg = RunConfig.from_dict(json.loads((job / "config.json").read_text()))
    torch.set_num_threads(1)
    stream = build_stream(cfg.stream, base_dir=job, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    learner = build_learner(cfg, stream)
    for i, task in enumerate(stream.tasks):
        learner.begin_task(i, task)  # a router per task
    with torch.no_grad():  # every route's experts and routers differ (the same draws in every process)
        generator = torch.Generator().manual_seed(7)
        for p in learner.model.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    learner.eval()
    accel = TrainingAccelerator()
    requests = [
        ClassifierRequest(tuple(t.classnames), tuple(t.templates), ("task", j), route)
        for j, t in enumerate(stream.tasks)
        for route in (None, *range(len(stream.tasks)))
    ]
    learner.build_classifiers(requests, accel.collectives)
    shared = {r.cache_key: learner._classifiers[r.cache_key] for r in requests}
    encoded = learner.prompts_encoded
    learner.invalidate_classifiers()
    alone = {r.cache_key: learner.eval_classifier(r.classnames, r.templates, r.key, r.route) for r in requests}
    record = {
        "rank": accel.rank,
        "world_size": accel.world_size,
        "encoded": encoded,
        "prompts": sum(len(r.classnames) * len(r.templates) for r in requests),
        "max_difference": max(float((shared[k] - alone[k]).abs().max()) for k in alone),
        "distinct": len({tuple(v.flatten().tolist()) for v in alone.values()}),
        "classifiers": len(alone),
    }
    (job / f"rank{accel.rank}.json").write_text(json.dumps(record))
    accel.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
