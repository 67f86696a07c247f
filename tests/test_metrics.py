from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecl.metrics import AccuracyMatrix

acc = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


@st.composite
def square(draw, min_t: int = 1, max_t: int = 6) -> np.ndarray:
    t = draw(st.integers(min_t, max_t))
    return np.array(draw(st.lists(st.lists(acc, min_size=t, max_size=t), min_size=t, max_size=t)))


def _filled(a: np.ndarray, zero_shot: np.ndarray | None = None, rows: int | None = None) -> AccuracyMatrix:
    t = a.shape[0]
    m = AccuracyMatrix([f"d{k}" for k in range(t)])
    for j in range(t):
        m.set_zero_shot(j, float(zero_shot[j]) if zero_shot is not None else 50.0)
    for i in range(t if rows is None else rows):
        for j in range(t):
            m.set(i, j, float(a[i, j]))
    return m


def _numpy_metrics(a: np.ndarray) -> dict[str, float | None]:
    """Direct transcription of method.md §5 / design.md for a full R x T matrix (R rows done)."""
    r, t = a.shape
    transfer_cols = [a[: min(j, r), j].mean() for j in range(1, t) if min(j, r) > 0]
    forget = [a[j : r - 1, j].max() - a[r - 1, j] for j in range(min(t, r - 1))]
    return {
        "transfer": float(np.mean(transfer_cols)) if transfer_cols else None,
        "average": float(a.mean()),
        "last": float(a[-1].mean()),
        "forgetting": float(np.mean(forget)) if forget else None,
    }


def _close(x: float | None, y: float | None) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and abs(x - y) <= 1e-9 * max(1.0, abs(y)))


def test_paper_style_hand_example() -> None:
    m = AccuracyMatrix(["aircraft", "caltech101", "cifar100"])
    for j, v in enumerate([50.0, 40.0, 30.0]):
        m.set_zero_shot(j, v)
    rows = [[80.0, 42.0, 31.0], [75.0, 90.0, 33.0], [70.0, 85.0, 95.0]]
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            m.set(i, j, v)
    assert m.is_complete()
    assert m.transfer() == pytest.approx((42.0 + (31.0 + 33.0) / 2) / 2)  # 37.0
    assert m.average() == pytest.approx(601.0 / 9)
    assert m.last() == pytest.approx(250.0 / 3)
    assert m.forgetting() == pytest.approx(((80.0 - 70.0) + (90.0 - 85.0)) / 2)  # 7.5
    d = m.to_dict()
    assert d["zero_shot"] == [50.0, 40.0, 30.0] and d["accuracy_matrix"] == rows
    assert (d["transfer"], d["last"]) == (pytest.approx(37.0), pytest.approx(83.3333333))


@settings(max_examples=60, deadline=None)
@given(square())
def test_metrics_equal_direct_numpy_computation(a: np.ndarray) -> None:
    m = _filled(a)
    expected = _numpy_metrics(a)
    for name in ("transfer", "average", "last", "forgetting"):
        assert _close(getattr(m, name)(), expected[name]), name


@settings(max_examples=40, deadline=None)
@given(square(min_t=2), st.data())
def test_partial_matrix_uses_completed_rows_only(a: np.ndarray, data) -> None:
    t = a.shape[0]
    done = data.draw(st.integers(0, t - 1))
    m = _filled(a, rows=done)
    if done < t:  # a half-filled next row (crash mid-evaluation) must be ignored
        m.set(done, 0, 1.0)
    assert m.completed_rows() == done and not m.is_complete()
    if done == 0:
        assert m.average() is None and m.last() is None and m.transfer() is None
        return
    expected = _numpy_metrics(a[:done])
    for name in ("transfer", "average", "last", "forgetting"):
        assert _close(getattr(m, name)(), expected[name]), name


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), acc)
def test_constant_matrix_gives_the_constant(t: int, c: float) -> None:
    m = _filled(np.full((t, t), c))
    assert m.average() == pytest.approx(c) and m.last() == pytest.approx(c)
    assert m.transfer() == (pytest.approx(c) if t > 1 else None)
    assert m.forgetting() == (0.0 if t > 1 else None)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6).flatmap(lambda t: st.lists(acc, min_size=t, max_size=t)))
def test_rows_equal_to_zero_shot_have_zero_forgetting(zero_shot: list[float]) -> None:
    t = len(zero_shot)
    zs = np.array(zero_shot)
    m = _filled(np.tile(zs, (t, 1)), zero_shot=zs)  # a model that never changes
    assert m.forgetting() == pytest.approx(0.0, abs=1e-9)
    assert m.last() == pytest.approx(zs.mean()) and m.average() == pytest.approx(zs.mean())
    assert m.transfer() == pytest.approx(zs[1:].mean())


@settings(max_examples=40, deadline=None)
@given(square(min_t=2), st.data())
def test_transfer_ignores_diagonal_and_below(a: np.ndarray, data) -> None:
    before = _filled(a).transfer()
    b = a.copy()
    t = a.shape[0]
    for i in range(t):
        for j in range(i + 1):
            b[i, j] = data.draw(acc)
    assert _close(_filled(b).transfer(), before)


@settings(max_examples=40, deadline=None)
@given(square(), st.data())
def test_to_dict_from_dict_round_trip_through_json(a: np.ndarray, data) -> None:
    t = a.shape[0]
    m = _filled(a, rows=data.draw(st.integers(0, t)))
    d = m.to_dict()
    back = AccuracyMatrix.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d and back == m


def test_cil_seen_accuracy_average_last_and_round_trip() -> None:
    m = AccuracyMatrix(["step0", "step1", "step2"], kind="cil")
    for j in range(3):
        m.set_zero_shot(j, 60.0)
    m.set(0, 0, 90.0)
    m.set_seen(0, 90.0)
    m.set(1, 0, 80.0)
    m.set(1, 1, 88.0)
    assert m.completed_rows() == 1  # seen accuracy of step 1 still missing
    m.set_seen(1, 84.0)
    m.set(2, 0, 70.0)
    m.set(2, 1, 75.0)
    m.set(2, 2, 92.0)
    m.set_seen(2, 79.0)
    assert m.is_complete()
    assert m.average() == pytest.approx((90.0 + 84.0 + 79.0) / 3)
    assert m.last() == 79.0 and m.transfer() is None
    assert m.forgetting() == pytest.approx(((90.0 - 70.0) + (88.0 - 75.0)) / 2)
    d = m.to_dict()
    assert d["seen_accuracy"] == [90.0, 84.0, 79.0] and d["accuracy_matrix"][0] == [90.0, None, None]
    assert AccuracyMatrix.from_dict(json.loads(json.dumps(d))) == m
    metrics_json = {k: v for k, v in d.items() if k != "kind"}  # results.py does not copy "kind"
    assert AccuracyMatrix.from_dict(metrics_json).kind == "cil"
    md = m.to_markdown()
    assert "seen classes" in md and "| Avg | Last |" in md and "84.0" in md


def test_row_set_and_nan_means_missing() -> None:
    m = AccuracyMatrix(["a", "b"])
    m.set(0, 1, float("nan"))
    assert m.row(0) == [None, None]
    m.set(0, 0, 12.5)
    row = m.row(0)
    row[0] = 99.0  # row() is a copy
    assert m.row(0) == [12.5, None]


def test_to_markdown_has_zero_shot_row_first_then_tasks_then_metrics() -> None:
    m = _filled(np.array([[80.0, 42.0], [75.0, 90.0]]), zero_shot=np.array([50.0, 40.0]))
    lines = m.to_markdown().splitlines()
    assert lines[0] == "| after task | d0 | d1 |"
    assert lines[2] == "| zero-shot | 50.0 | 40.0 |"
    assert lines[3] == "| d0 | 80.0 | 42.0 |" and lines[4] == "| d1 | 75.0 | 90.0 |"
    assert "| Transfer | Average | Last | Forgetting |" in lines
    assert lines[-1] == "| 42.0 | 71.8 | 82.5 | 5.0 |"
    partial = _filled(np.array([[80.0, 42.0], [75.0, 90.0]]), rows=1).to_markdown()
    assert "| d1 | – | – |" in partial and "1 of 2 tasks done" in partial


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="kind"):
        AccuracyMatrix(["a"], kind="dil")
    m = AccuracyMatrix(["a", "b"])
    with pytest.raises(IndexError, match="row 2"):
        m.set(2, 0, 1.0)
    with pytest.raises(ValueError, match=r"accuracy_matrix\[0\]\[0\]"):
        m.set(0, 0, "high")
    with pytest.raises(ValueError, match="set_seen"):
        m.set_seen(0, 1.0)
    with pytest.raises(ValueError, match="row 0 has 1 values"):
        AccuracyMatrix.from_dict({"tasks": ["a", "b"], "accuracy_matrix": [[1.0]]})
    with pytest.raises(ValueError, match="'tasks'"):
        AccuracyMatrix.from_dict({"accuracy_matrix": []})
