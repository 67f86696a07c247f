"""`moecl bench dist [--json] [--tiny] [--processes 1,2] [--threads T] [--repeats R]`: what N processes buy.

A small real run (the quickstart's lite backbone, two bundled datasets, DDAS) is started once per process count
through `accelerate launch` (moecl.launch; N CPU processes over gloo, one process without a launcher), and runs the
real engine loop (Engine.run: zero-shot row, then per task training, the DDAS fit, an evaluation row). The engine is
only instrumented (`_TimedEngine`): every evaluation row and every task's training is timed between two barriers
(so a phase's time is the wall time until the last process is done), and the images each process decoded in it are
counted (BatchPipeline.decoded). Reported per process count: the seconds of the timed row (the last one: every test
image through DDAS over every task's autoencoder, then its routed adapters), its ratio to one process, the images
each process decoded in training, in that row and in the DDAS fits, and the totals, and the class prompts each
process encoded for that row's text classifiers (Learner.build_classifiers shares them out).

Fair comparison: every process runs `threads` torch threads (default 1), so N processes use N times the cores of
one; the output says so. The bench config turns the prefix cache and evaluation reuse off, so every row decodes and
computes all its images (a row's full cost, not a cache's). Target: each process decodes about 1/N of the images
(within 10% of total/N); the time ratio is measured, never asserted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecl.config import RunConfig
from moecl.engine import Engine

DECODE_TOLERANCE = 0.10  # target: every process decodes within 10% of total / N
TARGET_PHASES = ("train", "eval")  # the phases the decode target is about (the DDAS fits are reported only)
JOB_FILE = "job.json"
WORKER_MODULE = "moecl.bench_dist"  # `python -m` of this module runs one process of a launch (worker_main)
LAUNCH_TIMEOUT_S = 1800  # a launch past this is killed (a hung collective would wait forever)


# --------------------------------------------------------------------------------------------------------------
# What is run
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistScale:
    """The run each process count repeats: the quickstart config on a shorter stream, DDAS without a reference."""

    label: str
    datasets: tuple[str, ...] = ("caltech101", "cifar10")
    max_train_per_class: int | None = 8
    max_test_per_class: int | None = None  # None: the whole bundled test split (200 per dataset)
    iterations: int = 4
    batch_size: int = 32
    eval_batch_size: int = 25  # 200 test images = 8 batches: every process evaluates the same number
    selector_iterations: int = 20

    def __post_init__(self) -> None:
        if not self.datasets or min(self.iterations, self.batch_size, self.eval_batch_size) < 1:
            raise ValueError(f"DistScale {self.label!r}: needs datasets, iterations, batch sizes >= 1")

    def config(self, threads: int) -> RunConfig:
        from moecl.config import quickstart_config

        cfg = quickstart_config()
        return cfg.replace(
            device="cpu",  # N CPU processes (gloo); a GPU machine would place each process on its own GPU
            threads=threads,
            backbone=dataclasses.replace(cfg.backbone, cache_prefix=False),
            selector=dataclasses.replace(
                cfg.selector,
                iterations=self.selector_iterations,
                reference=None,  # no reference AE: the bench is about the task rows, not the setup
                negatives=None,
            ),
            optim=dataclasses.replace(
                cfg.optim,
                iterations=self.iterations,
                warmup_steps=1,
                batch_size=self.batch_size,
                eval_batch_size=self.eval_batch_size,
            ),
            stream=dataclasses.replace(
                cfg.stream,
                datasets=self.datasets,
                max_train_per_class=self.max_train_per_class,
                max_test_per_class=self.max_test_per_class,
            ),
            # in-process decoding (the counts are this process's), every row computes all its images
            data=dataclasses.replace(cfg.data, workers=0, cache_mb=0.0, reuse_eval=False),
        )


DIST_LITE = DistScale("lite backbone (128 px), bundled caltech101 -> cifar10, 400 test images per row")
DIST_TINY = DistScale(
    "lite backbone (128 px), bundled caltech101 -> cifar10, 150 test images per row",
    max_train_per_class=4,
    max_test_per_class=5,
    iterations=2,
    batch_size=16,
)  # caltech101: 100 test images, cifar10: 50 (eval batch 25: 4 + 2 batches, split evenly)


def parse_processes(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2): distinct process counts >= 1, in the given order. ValueError otherwise."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--processes {text!r}: expected counts like 1,2") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise ValueError(f"--processes {text!r}: expected distinct counts >= 1, like 1,2")
    return counts


# --------------------------------------------------------------------------------------------------------------
# Inside each launched process
# --------------------------------------------------------------------------------------------------------------
class _TimedEngine(Engine):
    """The engine, unchanged, with each task's training and each evaluation row timed and its decodes counted."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.phases: dict[str, tuple[float, int]] = {}  # "train0", "eval0" (zero-shot), "eval1", ...
        self.prompts: dict[str, int] = {}  # class prompts this process encoded in each phase

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        barrier = self.accel.collectives.sum  # a collective: every process reaches it at the same point
        barrier(torch.zeros(1))  # every process starts the phase together
        decoded, prompts, start = self.data.decoded, self.learner.prompts_encoded, time.perf_counter()
        yield
        barrier(torch.zeros(1))  # ... and the phase lasts until the last one is done
        self.phases[name] = (time.perf_counter() - start, self.data.decoded - decoded)
        self.prompts[name] = self.learner.prompts_encoded - prompts

    def train_task(self, state: Any, i: int, task: Any, opt_json: dict | None, opt_tensors: dict) -> None:
        with self._phase(f"train{i}"):
            super().train_task(state, i, task, opt_json, opt_tensors)

    def evaluate(self, state: Any, learned: int) -> None:
        with self._phase(f"eval{learned}"):
            super().evaluate(state, learned)


def worker_main(job: Path) -> None:
    """One process of a launch: the run of job.json through the instrumented engine; writes rank<R>.json."""
    from moecl.accel import tune_cpu_allocator
    from moecl.data.tasks import build_stream, validate_stream
    from moecl.methods import build_learner

    spec = json.loads((job / JOB_FILE).read_text(encoding="utf-8"))
    cfg = RunConfig.from_dict(spec["config"])
    tune_cpu_allocator()  # as `moecl train` does
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stream = build_stream(cfg.stream, base_dir=Path(spec["base"]), seed=cfg.seed)
    validate_stream(stream)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    engine = _TimedEngine(build_learner(cfg, stream), stream, cfg, job / "run", quiet=True)
    try:
        engine.run()
    finally:
        engine.tracker.close()
    rank = engine.accel.rank
    record = {
        "rank": rank,
        "world_size": engine.accel.world_size,
        "threads": torch.get_num_threads(),
        "phases": engine.phases,
        "decoded": engine.data.decoded,
        "prompts": engine.prompts,
    }
    (job / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    engine.accel.close()  # drops the DDP wrapper before the process group (see TrainingAccelerator.close)


# --------------------------------------------------------------------------------------------------------------
# The launches and what they measured
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """What one launch of `processes` processes measured (per-process lists are in rank order)."""

    processes: int
    threads: int  # torch threads each process ran
    rows_s: tuple[float, ...]  # every evaluation row (zero-shot first), wall time until the last process is done
    train_s: float  # every task's training together
    decoded: Mapping[str, tuple[int, ...]]  # per phase ("train", "eval": the timed row, "eval_all", "ddas", "total")
    prompts: tuple[int, ...]  # class prompts each process encoded for the timed row's classifiers
    wall_s: float  # the whole launch: start-up, model load, the run

    @property
    def eval_s(self) -> float:
        """The timed row: the last one (after every task)."""
        return self.rows_s[-1]

    def images(self, phase: str) -> int:
        return sum(self.decoded[phase])

    def split_ok(self, phase: str) -> bool:
        """Every process decoded within DECODE_TOLERANCE of an equal share of the phase's images."""
        share = self.images(phase) / self.processes
        return all(abs(n - share) <= DECODE_TOLERANCE * share for n in self.decoded[phase])

    @classmethod
    def from_records(cls, processes: int, records: Sequence[Mapping[str, Any]], wall_s: float) -> Launch:
        records = sorted(records, key=lambda r: r["rank"])
        if len(records) != processes or any(r["world_size"] != processes for r in records):
            raise RuntimeError(f"a launch of {processes} processes reported {len(records)} of them")
        phases = records[0]["phases"]
        rows = sorted(int(k[len("eval") :]) for k in phases if k.startswith("eval"))
        tasks = [k for k in phases if k.startswith("train")]

        def seconds(name: str) -> float:  # equal on every process up to the barrier's exit: take the slowest
            return max(r["phases"][name][0] for r in records)

        def count(names: Sequence[str], r: Mapping[str, Any]) -> int:
            return sum(r["phases"][n][1] for n in names)

        evals = [f"eval{k}" for k in rows]
        decoded = {
            "train": tuple(count(tasks, r) for r in records),
            "eval": tuple(count(evals[-1:], r) for r in records),
            "eval_all": tuple(count(evals, r) for r in records),
            # outside training and evaluation: the DDAS feature passes of each task's autoencoder fit
            "ddas": tuple(r["decoded"] - count([*tasks, *evals], r) for r in records),
            "total": tuple(r["decoded"] for r in records),
        }
        return cls(
            processes=processes,
            threads=records[0]["threads"],
            rows_s=tuple(seconds(name) for name in evals),
            train_s=sum(seconds(name) for name in tasks),
            decoded=decoded,
            prompts=tuple(r.get("prompts", {}).get(evals[-1], 0) for r in records),
            wall_s=wall_s,
        )


def launch(cfg: RunConfig, base: Path, processes: int, directory: Path, timeout_s: float = LAUNCH_TIMEOUT_S) -> Launch:
    """Run `cfg` with `processes` processes (one: a plain process, as `moecl train`; more: `accelerate launch`)."""
    from moecl.launch import accelerate_command, process_env, run_to_end

    directory.mkdir(parents=True)
    (directory / JOB_FILE).write_text(json.dumps({"config": cfg.to_dict(), "base": str(base)}), encoding="utf-8")
    argv = [WORKER_MODULE, str(directory)]
    cmd = [sys.executable, "-m", *argv] if processes == 1 else accelerate_command(processes, argv)
    start = time.perf_counter()
    status, output = run_to_end(cmd, process_env(cfg.threads or 1), timeout_s)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"bench dist: the launch of {processes} processes failed ({status}):\n{output[-3000:]}")
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("rank*.json"))]
    return Launch.from_records(processes, records, wall)


def bench_dist(
    cfg: RunConfig,
    base: Path,
    processes: Sequence[int] = (1, 2),
    repeats: int = 1,
    label: str = "",
    timeout_s: float = LAUNCH_TIMEOUT_S,
) -> dict[str, Any]:
    """Launch `cfg` with each process count, `repeats` rounds (process counts interleaved round-robin); the
    median row time per count, the decode counts of the last round (they are the same every round). A launch
    that fails or outlives `timeout_s` is killed (all its processes) and raises RuntimeError."""
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} must be >= 1")
    launches: dict[int, list[Launch]] = {n: [] for n in processes}
    with tempfile.TemporaryDirectory(prefix="moecl-bench-dist-") as tmp:
        for round_ in range(repeats):
            order = list(processes)[round_ % len(processes) :] + list(processes)[: round_ % len(processes)]
            for n in order:
                launches[n].append(launch(cfg, base, n, Path(tmp) / f"r{round_}-p{n}", timeout_s))
    one = statistics.median(x.eval_s for x in launches[1]) if 1 in launches else None
    one_all = statistics.median(sum(x.rows_s) for x in launches[1]) if 1 in launches else None
    runs = []
    for n, done in launches.items():
        last = done[-1]
        eval_s = statistics.median(x.eval_s for x in done)
        all_s = statistics.median(sum(x.rows_s) for x in done)
        runs.append(
            {
                "processes": n,
                "threads_per_process": last.threads,
                "eval_s": eval_s,
                "eval_s_per_repeat": [x.eval_s for x in done],
                "speedup": None if one is None else one / eval_s,
                "rows_s": [statistics.median(x.rows_s[k] for x in done) for k in range(len(last.rows_s))],
                "all_rows_s": all_s,
                "all_rows_speedup": None if one_all is None else one_all / all_s,
                "train_s": statistics.median(x.train_s for x in done),
                "wall_s": statistics.median(x.wall_s for x in done),
                "decoded_per_process": {phase: list(v) for phase, v in last.decoded.items()},
                "prompts_per_process": list(last.prompts),
                "images": {phase: last.images(phase) for phase in last.decoded},
                "split_within_tolerance": {phase: last.split_ok(phase) for phase in TARGET_PHASES},
            }
        )
    threads = sorted({r["threads_per_process"] for r in runs})
    cores = ", ".join(_cores(r["processes"], r["threads_per_process"]) for r in runs)
    result = {
        "scale": label,
        "device": cfg.device,
        "backend": "gloo" if cfg.device == "cpu" else "nccl",
        "threads_per_process": threads[0] if len(threads) == 1 else threads,
        "fairness": f"every process runs {' or '.join(map(str, threads))} torch thread(s) ({cores})",
        "timed_row": f"row {len(runs[0]['rows_s']) - 1} (after the last task; rows_s[0] is the zero-shot row)",
        "repeats": repeats,
        "runs": runs,
    }
    result["targets_met"] = targets(result)
    return result


def _cores(processes: int, threads: int) -> str:
    return f"{processes} process{'es' if processes > 1 else ''} x {threads} = {processes * threads} cores"


def targets(result: Mapping[str, Any]) -> dict[str, bool]:
    """Per process count > 1 and phase: every process decoded within 10% of total/N of that phase's images."""
    met = {}
    for run in result["runs"]:
        n = run["processes"]
        if n > 1:
            for phase in TARGET_PHASES:
                key = f"{n} processes: {phase} decodes per process within {DECODE_TOLERANCE:.0%} of total/{n}"
                met[key] = run["split_within_tolerance"][phase]
    return met


def run(tiny: bool = False, processes: Sequence[int] = (1, 2), threads: int = 1, repeats: int = 1) -> dict[str, Any]:
    """The bench at DIST_LITE (DIST_TINY when `tiny`) with `threads` torch threads per process."""
    from moecl.accel import tune_cpu_allocator

    if threads < 1:
        raise ValueError(f"threads: {threads} must be >= 1")
    scale = DIST_TINY if tiny else DIST_LITE
    result = bench_dist(scale.config(threads), Path.cwd(), processes, repeats, scale.label)
    return {**result, "malloc_tuned": tune_cpu_allocator()}


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------
def _per_process(values: Sequence[int]) -> str:
    return "+".join(str(v) for v in values)


def format_result(result: Mapping[str, Any]) -> str:
    """A table (one line per process count), then the targets."""
    lines = [
        f"bench dist: {result['scale']} [{result['device']}, {result['backend']}, median of {result['repeats']}]",
        f"  fair comparison: {result['fairness']}; timed: evaluation {result['timed_row']}",
        f"  {'processes':>9} {'eval s':>8} {'speedup':>8} {'rows s (zero-shot, ...)':>24} {'train s':>8}   "
        "decoded per process: train | eval row | DDAS fits   (total images: train, eval row)   prompts encoded",
    ]
    for r in result["runs"]:
        d, images = r["decoded_per_process"], r["images"]
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        rows = ", ".join(f"{s:.1f}" for s in r["rows_s"])
        lines.append(
            f"  {r['processes']:>9} {r['eval_s']:>8.2f} {speedup:>8} {rows:>24} {r['train_s']:>8.2f}   "
            f"{_per_process(d['train'])} | {_per_process(d['eval'])} | {_per_process(d['ddas'])}   "
            f"({images['train']}, {images['eval']})   {_per_process(r['prompts_per_process'])}"
        )
    for target, met in result["targets_met"].items():
        lines.append(f"  TARGET {target}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def markdown_table(result: Mapping[str, Any]) -> str:
    """The runs of a bench_dist result as the table of docs/performance.md."""
    rows = [
        "| processes x threads | eval row (s) | speedup | every row (s), zero-shot first | "
        "decoded per process: train / eval row / DDAS fits | prompts encoded per process, eval row |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        d = r["decoded_per_process"]
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        decoded = " / ".join(_per_process(d[p]) for p in ("train", "eval", "ddas"))
        every = ", ".join(f"{s:.1f}" for s in r["rows_s"])
        rows.append(
            f"| {r['processes']} x {r['threads_per_process']} | {r['eval_s']:.1f} | {speedup} | {every} | {decoded} "
            f"| {_per_process(r['prompts_per_process'])} |"
        )
    return "\n".join(rows)


def script_main(argv: list[str] | None = None) -> int:
    """benchmarks/dist.py: `[--tiny] [--json] [--processes 1,2] [--threads T] [--repeats R]`."""
    import argparse

    parser = argparse.ArgumentParser(description="moecl benchmark: dist (evaluation time with 1..N processes)")
    parser.add_argument("--tiny", action="store_true", help="a smaller stream (fast)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--processes", default="1,2", help="process counts, e.g. 1,2 (default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="launches per process count (median)")
    args = parser.parse_args(argv)
    result = run(args.tiny, parse_processes(args.processes), args.threads, args.repeats)
    print(json.dumps(result) if args.json else f"{format_result(result)}\n{markdown_table(result)}")
    return 0


if __name__ == "__main__":  # one process of a launch (see `launch`): the job directory is the only argument
    worker_main(Path(sys.argv[1]))
