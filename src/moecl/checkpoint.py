"""Crash-safe files and checkpoints: atomic writes, safetensors + JSON checkpoints, RNG state for exact resume.

No pickle anywhere: tensors go to safetensors, everything else to JSON. Every write goes through `_write_fd`, so a
full disk surfaces as one OSError whose message says "disk full" and names the file, and a failed write never
leaves a half-written target behind (temp file in the same directory + fsync + os.replace + fsync of the directory).

A checkpoint is a directory `root/<seq>-<tag>/` holding tensors.safetensors, state.json and MANIFEST.json (sha256
and size of both). It is written under a hidden temp name and renamed into place, so it appears whole or not at
all; `CheckpointStore.load_latest()` still re-verifies the manifest and falls back to the newest good checkpoint
when a later one was truncated or edited (and says which it skipped). One writer per store is assumed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "MANIFEST.json"
FORMAT_VERSION = 1
KEEP_CHECKPOINTS = 3  # a run keeps its newest 3 checkpoints: the latest plus fallbacks if it is damaged

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_CHECKPOINT_DIR = re.compile(r"^(\d{6,})-([A-Za-z0-9_.\-]+)$")
_TAG = re.compile(r"^[A-Za-z0-9_.\-]+$")


class CheckpointError(ValueError):
    """No usable checkpoint, or one that cannot be written/read; the message is meant for the user as-is."""


CRASH_ENV = "MOECL_TEST_KILL_AT"


def crash_point(name: str) -> None:
    """Test-only hook for the crash/resume tests: when $MOECL_TEST_KILL_AT equals `name` the process kills itself
    right here with SIGKILL (or sends itself SIGTERM when the value ends in ":TERM"). Unset in normal use.

    Points: "task<i>-step<s>" (after optimiser step s of task i), "eval<n>-ds<j>" (evaluating dataset j after n
    tasks), "writing-<tag>" (checkpoint files written, manifest and rename not yet), "saved-<tag>" (just renamed).
    """
    spec = os.environ.get(CRASH_ENV)
    if spec and spec.split(":", 1)[0] == name:
        os.kill(os.getpid(), signal.SIGTERM if spec.endswith(":TERM") else signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------------------
def _disk_full(exc: OSError, path: Path) -> OSError:
    return OSError(exc.errno, f"disk full: could not write {path} ({exc.strerror or exc}); free some space and retry")


def _write_fd(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of `data` (os.write may write less than asked) and fsync."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    # Makes a rename/creation inside `path` durable; some filesystems do not support it, which is harmless.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_write(path: Path, data: bytes | bytearray | memoryview, shown: Path) -> None:
    """Create `path` (must not exist), write and fsync it; on failure remove it. ENOSPC becomes a "disk full"
    error naming `shown` (the file the user asked for, not our temp name)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_fd(fd, data)
        finally:
            os.close(fd)
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if _is_disk_full(exc):
            raise _disk_full(exc, shown) from exc
        raise


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL and "disk full" not in str(exc)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Replace `path` with `data` atomically: readers see the old file or the new one, never a mix.

    Creates missing parent directories. On any error the temp file is removed and the target is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _create_write(tmp, data, path)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(exc):
            raise _disk_full(exc, path) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Tensors (safetensors)
# --------------------------------------------------------------------------------------------------------------
def _tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError("safetensors metadata must map str to str")
    plain: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"checkpoint tensor '{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():  # safetensors refuses tensors sharing memory (tied weights, views)
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        plain[name] = t
    return _st_save(plain, metadata=dict(metadata) if metadata is not None else None)


def _tensors_from_bytes(data: bytes, where: Path) -> dict[str, torch.Tensor]:
    try:
        return _st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: not a valid safetensors file ({exc})") from exc


def prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose key starts with `prefix`, with it stripped: one section ("learner.", "adapters.", ...) of
    the flat tensor dict a checkpoint stores."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` (moved to CPU, made contiguous) to a safetensors file, atomically."""
    atomic_write_bytes(path, _tensor_bytes(tensors, metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    return _tensors_from_bytes(path.read_bytes(), path)


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored by save_tensors (empty dict when none)."""
    path = Path(path)
    with open(path, "rb") as f:
        header = f.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{path}: not a valid safetensors file (too short)")
        size = int.from_bytes(header, "little")
        try:
            head = json.loads(f.read(size))
        except ValueError as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file (bad header)") from exc
    return dict(head.get("__metadata__") or {})


# --------------------------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------------------------
class LoadedCheckpoint(NamedTuple):
    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """Numbered checkpoint directories under `root`; the newest `keep` are kept."""

    def __init__(self, root: str | os.PathLike, keep: int = KEEP_CHECKPOINTS):
        if keep < 1:
            raise CheckpointError(f"CheckpointStore keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, oldest first (by sequence number)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _CHECKPOINT_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, tag: str, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> Path:
        """Write a new checkpoint directory atomically and prune old ones; returns its path."""
        if not _TAG.match(tag):
            raise CheckpointError(f"checkpoint tag '{tag}' may only contain letters, digits, '_', '.', '-'")
        try:
            state_bytes = (json.dumps(state, indent=1) + "\n").encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"state of checkpoint '{tag}' is not JSON-serialisable: {exc}") from exc
        tensor_bytes = _tensor_bytes(tensors, {"format": str(FORMAT_VERSION), "tag": tag})
        self.root.mkdir(parents=True, exist_ok=True)
        existing = self.checkpoints()
        seq = int(_CHECKPOINT_DIR.match(existing[-1].name).group(1)) + 1 if existing else 1
        final = self.root / f"{seq:06d}-{tag}"
        tmp = self.root / f".tmp-{final.name}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            files = {TENSORS_FILE: tensor_bytes, STATE_FILE: state_bytes}
            for name, data in files.items():
                _create_write(tmp / name, data, final / name)
            crash_point(f"writing-{tag}")
            manifest = {
                "format": FORMAT_VERSION,
                "seq": seq,
                "tag": tag,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": {name: {"sha256": _sha256(data), "size": len(data)} for name, data in files.items()},
            }
            _create_write(
                tmp / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"), final / MANIFEST_FILE
            )
            _fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_disk_full(exc):
                raise _disk_full(exc, final) from exc
            raise
        _fsync_dir(self.root)
        crash_point(f"saved-{tag}")
        self._prune()
        return final

    def _prune(self) -> None:
        # Leftover temp directories are from saves that crashed; old checkpoints beyond `keep` are not needed.
        stale = [p for p in self.root.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]
        stale += self.checkpoints()[: -self.keep]
        for p in stale:
            try:
                shutil.rmtree(p)
            except OSError as exc:
                warnings.warn(f"could not remove old checkpoint {p}: {exc}", RuntimeWarning, stacklevel=3)

    def load(self, path: str | os.PathLike) -> LoadedCheckpoint:
        """Load one checkpoint directory after verifying its manifest; CheckpointError names what is wrong."""
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text("utf-8"))
            files = manifest["files"]
        except FileNotFoundError as exc:
            raise CheckpointError(f"{manifest_path} is missing (incomplete checkpoint)") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{manifest_path} is not a valid manifest ({exc})") from exc
        for required in (TENSORS_FILE, STATE_FILE):
            if required not in files:
                raise CheckpointError(f"{manifest_path} does not list {required}")
        contents: dict[str, bytes] = {}
        for name, entry in files.items():
            file = path / name
            try:
                data = file.read_bytes()
            except FileNotFoundError as exc:
                raise CheckpointError(f"{file} is missing") from exc
            if len(data) != entry.get("size"):
                raise CheckpointError(f"{file} has {len(data)} bytes, manifest says {entry.get('size')} (truncated?)")
            if _sha256(data) != entry.get("sha256"):
                raise CheckpointError(f"{file} does not match its sha256 in the manifest (modified or corrupt)")
            contents[name] = data
        try:
            state = json.loads(contents[STATE_FILE])
        except ValueError as exc:
            raise CheckpointError(f"{path / STATE_FILE} is not valid JSON ({exc})") from exc
        tensors = _tensors_from_bytes(contents[TENSORS_FILE], path / TENSORS_FILE)
        return LoadedCheckpoint(path, tensors, state)

    def load_latest(self) -> tuple[LoadedCheckpoint | None, list[str]]:
        """(newest valid checkpoint or None, problems of the newer ones skipped). Raises CheckpointError when
        checkpoints exist but none is valid."""
        problems: list[str] = []
        candidates = self.checkpoints()
        for path in reversed(candidates):
            try:
                return self.load(path), problems
            except CheckpointError as exc:
                problems.append(str(exc))
        if candidates:
            raise CheckpointError(
                f"no valid checkpoint in {self.root} ({'; '.join(problems)}); "
                "start the run again without --resume (or with --overwrite)"
            )
        return None, problems


# --------------------------------------------------------------------------------------------------------------
# RNG state for exact resume
# --------------------------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Python `random`, numpy's global and torch's CPU (and CUDA) generator states as (tensors, JSON)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return tensors, js


def set_rng_state(tensors: Mapping[str, torch.Tensor], js: Mapping[str, Any]) -> None:
    """Inverse of rng_state. CUDA states are restored only when CUDA is available (a CPU resume ignores them)."""
    try:
        py = js["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        npj = js["numpy"]
        keys = np.asarray(npj["keys"], dtype=np.uint32)
        np.random.set_state((npj["name"], keys, npj["pos"], npj["has_gauss"], npj["cached_gaussian"]))
        torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint RNG state is incomplete or invalid ({exc!r})") from exc
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors, key=_cuda_index) if k.startswith("torch_cuda_")]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _cuda_index(key: str) -> int:
    return int(key.rsplit("_", 1)[1]) if key.startswith("torch_cuda_") else -1
