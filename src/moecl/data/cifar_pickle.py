"""The CIFAR-10 / CIFAR-100 *python* archives (what torchvision downloads), read without running code from the file.

cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} and cifar-100-python/{train,test,meta} are Python 2
pickles of dicts of str -> int / str / list / numpy uint8 array. `pickle.load` would import and call any global a
file names (a crafted file runs `os.system`), so `load` uses an Unpickler whose `find_class` admits only the three
globals a numpy array pickles to: `numpy.core.multiarray._reconstruct` (`numpy._core.multiarray` from numpy 2),
`numpy.ndarray` and `numpy.dtype`; anything else is refused with a DataError. Strings are decoded as latin-1, as
torchvision does (Python 2 str; numpy needs it for the array bytes).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moecl.data.folder import DataError

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a CIFAR python file holds only numpy arrays, lists, str and int"
            )
        return allowed


def load(path: Path) -> Any:
    """Unpickle `path` admitting only the types of the CIFAR python files; DataError otherwise."""
    try:
        with open(path, "rb") as f:
            return _Unpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataError(f"{path} is not a CIFAR python file ({exc}); nothing in it was run") from exc


def _dict(path: Path) -> dict[str, Any]:
    obj = load(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def label_names(meta: Path, key: str) -> list[str]:
    """Class names from batches.meta ("label_names") or meta ("fine_label_names")."""
    names = _dict(meta).get(key)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{meta}: no list of str under '{key}'")
    return names


def read_batches(paths: Sequence[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, pixels) of CIFAR python batch files: int labels and HWC uint8 32x32x3 images, in file order."""
    labels, pixels = [], []
    for path in paths:
        batch = _dict(path)
        data, y = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: 'data' is not a uint8 array of 3072-byte rows (R, G, B planes of 32x32)")
        if not isinstance(y, list) or len(y) != len(data) or not all(isinstance(v, int) for v in y):
            raise DataError(f"{path}: '{label_key}' is not a list of {len(data)} int labels")
        labels.append(np.asarray(y, dtype=np.int64))
        pixels.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(labels), np.ascontiguousarray(np.concatenate(pixels))
