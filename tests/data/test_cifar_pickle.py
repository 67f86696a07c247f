"""CIFAR python archives: read through the restricted unpickler, both as Python 2 wrote them (numpy.core names) and
as Python 3 / numpy 2 write them (numpy._core names); a pickle that names any other global is refused unrun."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from moecl.data import cifar_pickle, readers
from moecl.data.folder import DataError


def _py2_dumps(obj) -> bytes:
    """Protocol-2 pickle as Python 2's cPickle wrote the CIFAR files: str as BINSTRING, numpy arrays via
    numpy.core.multiarray._reconstruct + numpy.ndarray + numpy.dtype (GLOBAL opcodes)."""
    out = bytearray(b"\x80\x02")

    def string(x: str | bytes) -> None:
        b = x if isinstance(x, bytes) else x.encode("latin1")
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)

    def glob(module: str, name: str) -> None:
        out.extend(b"c" + f"{module}\n{name}\n".encode())

    def dump(x) -> None:
        if isinstance(x, dict):
            out.extend(b"}(")
            for k, v in x.items():
                dump(k)
                dump(v)
            out.extend(b"u")
        elif isinstance(x, list):
            out.extend(b"](")
            for v in x:
                dump(v)
            out.extend(b"e")
        elif isinstance(x, int):
            out.extend(b"J" + struct.pack("<i", x))
        elif isinstance(x, (str, bytes)):
            string(x)
        elif isinstance(x, np.ndarray):
            assert x.dtype == np.uint8
            glob("numpy.core.multiarray", "_reconstruct")
            glob("numpy", "ndarray")
            out.extend(b"K\x00\x85")
            string("b")
            out.extend(b"\x87R(K\x01(")
            for d in x.shape:
                dump(int(d))
            out.extend(b"t")
            glob("numpy", "dtype")
            string("u1")
            out.extend(b"K\x00K\x01\x87R(K\x03")
            string("|")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(x.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(x))

    dump(obj)
    return bytes(out + b".")


def _batch(n: int, seed: int, label_key: str, classes: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "batch_label": "testing batch 1 of 1",
        label_key: [int(v) for v in rng.integers(0, classes, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }


def _hwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_python2_cifar10_archive_reads_like_pickle_would(tmp_path):
    base = tmp_path / "cifar-10-batches-py"  # torchvision's folder, directly under the data root
    base.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(_py2_dumps({"num_cases_per_batch": 3, "label_names": names, "num_vis": 3072}))
    batches = {f"data_batch_{i}": _batch(3, i, "labels", 10) for i in range(1, 6)}
    batches["test_batch"] = _batch(4, 9, "labels", 10)
    for fname, batch in batches.items():
        (base / fname).write_bytes(_py2_dumps(batch))
    # the fixture is a valid pickle: the unrestricted loader (what torchvision runs) sees the same content
    plain = pickle.loads((base / "test_batch").read_bytes(), encoding="latin1")
    restricted = cifar_pickle.load(base / "test_batch")
    assert plain["labels"] == restricted["labels"] and np.array_equal(plain["data"], restricted["data"])
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        ds = readers.read_cifar10(tmp_path, split)
        assert ds.classnames == tuple(names)
        assert ds.labels == [y for f in files for y in batches[f]["labels"]]
        pixels = np.concatenate([_hwc(batches[f]["data"]) for f in files])
        for i in (0, len(ds) - 1):
            assert np.array_equal(np.asarray(ds[i][0]), pixels[i])


def test_python3_cifar100_archive_with_numpy2_names(tmp_path):
    base = tmp_path / "cifar100" / "cifar-100-python"  # continuum's layout (the official CIL code)
    base.mkdir(parents=True)
    fine = [f"class_{i:02d}" for i in range(100)]
    meta = {"fine_label_names": fine, "coarse_label_names": [f"super_{i}" for i in range(20)]}
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    split_batches = {"train": _batch(6, 1, "fine_labels", 100), "test": _batch(2, 2, "fine_labels", 100)}
    for split, batch in split_batches.items():
        batch["coarse_labels"] = [0] * len(batch["data"])
        raw = pickle.dumps(batch, protocol=4)
        assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
        (base / split).write_bytes(raw)
    for split, batch in split_batches.items():
        ds = readers.read_cifar100(tmp_path / "cifar100", split)
        assert ds.classnames == tuple(fine) and ds.labels == batch["fine_labels"]
        assert np.array_equal(np.asarray(ds[1][0]), _hwc(batch["data"])[1])


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_pickle_naming_os_system_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    evil = {"label_names": ["a"], "payload": _Evil(f"touch {marker}")}
    (base / "batches.meta").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match=r"refused global (posix|os)\.system.*nothing in it was run"):
        readers.read_cifar10(tmp_path, "test")
    assert not marker.exists()
    # other globals too (builtins.eval via a protocol-0 GLOBAL opcode), and a non-dict payload
    (base / "batches.meta").write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DataError, match=r"refused global builtins\.eval"):
        cifar_pickle.load(base / "batches.meta")
    (base / "batches.meta").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DataError, match="expected a pickled dict"):
        cifar_pickle.label_names(base / "batches.meta", "label_names")


def test_batches_with_the_wrong_contents_are_clear_errors(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(_py2_dumps({"labels": [1], "data": np.zeros((1, 100), np.uint8)}))
    with pytest.raises(DataError, match="3072-byte rows"):
        cifar_pickle.read_batches([path], "labels")
    path.write_bytes(_py2_dumps({"labels": [1, 2], "data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(DataError, match="list of 1 int labels"):
        cifar_pickle.read_batches([path], "labels")
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR python file"):
        cifar_pickle.load(path)
    with pytest.raises(DataError, match="cannot read"):
        cifar_pickle.load(Path(tmp_path / "absent"))
