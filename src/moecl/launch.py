"""Start N local processes of a Python module under `accelerate launch` (on a machine without GPUs: N CPU
processes over gloo), the way a researcher launches `moecl train` on one node. Used by `moecl bench dist` and by
the multi-process tests, so both exercise the launch a user runs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import moecl

SOURCE_ROOT = Path(moecl.__file__).resolve().parents[1]  # the folder that holds this moecl package


def free_port() -> int:
    """A TCP port nothing listens on now (the launcher's rendezvous port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(
    processes: int, module_argv: Sequence[str], port: int | None = None, module: bool = True
) -> list[str]:
    """`python -m accelerate.commands.launch --multi_gpu --num_processes N ... -m MODULE ARGS` on one machine,
    without mixed precision or dynamo (the run's config decides those); `module` False: SCRIPT ARGS instead."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(port or free_port())]
    return [*cmd, *(["-m"] if module else []), *module_argv]


def process_env(threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a launched process: this moecl first on the path (the children import the same sources as
    the parent) and `threads` OpenMP threads per process (N processes on N cores must not oversubscribe them)."""
    path = os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path, **(extra or {})}


def run_to_end(cmd: Sequence[str], env: Mapping[str, str], timeout_s: float) -> tuple[int, str]:
    """Run `cmd` in its own process group; -> (exit status, stdout+stderr). Past `timeout_s`, or when the caller
    is interrupted, the whole group is killed: a launched process left waiting in a collective for a peer that
    died would otherwise wait (and hold its memory) long after the launcher is gone."""
    proc = subprocess.Popen(
        list(cmd), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        return -signal.SIGKILL, f"{out}\n(killed after {timeout_s:.0f} s)"
    except BaseException:
        _kill_group(proc)
        raise
    return proc.returncode, out


def _kill_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM first: a launcher (torch elastic) passes it on to its workers, which it starts in their own process
    groups; then SIGKILL to whatever is left of the group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
