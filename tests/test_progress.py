"""Progress output: a tqdm bar on a terminal, whole lines (same information) in a file."""

from __future__ import annotations

import io

from tqdm import tqdm

from moecl.progress import LineBar, bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _clocked(total: int, interval: float, step_s: float, **kwargs):
    now = [0.0]
    out = io.StringIO()
    b = LineBar(total, "train x", file=out, interval=interval, clock=lambda: now[0], **kwargs)

    def tick(n: int = 1) -> None:
        now[0] += step_s
        b.update(n)

    return b, tick, out


def test_a_file_gets_one_line_per_tenth_with_the_bar_statistics():
    b, tick, out = _clocked(100, interval=1.0, step_s=0.5)
    for i in range(100):
        tick()
        if i % 10 == 0:
            b.set_postfix(loss=f"{i / 100:.3f}")
    b.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10%, 20%, ..., 100%; close does not repeat the last one
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("train x:  10% 10/100 [00:05<00:45")
    assert "2.00it/s" in lines[0] and lines[0].endswith("loss=0.000]")
    assert lines[-1].startswith("train x: 100% 100/100") and "loss=0.900" in lines[-1]


def test_lines_are_rate_limited_and_a_short_pass_prints_nothing():
    b, tick, out = _clocked(1000, interval=10.0, step_s=0.011)  # 11 s in all: one line, at the end
    for _ in range(1000):
        tick()
    b.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "1000/1000 [00:10<00:00, 90.91it/s]" in lines[0]
    short, tick, out = _clocked(50, interval=10.0, step_s=0.01)
    for _ in range(50):
        tick()
    short.close()
    assert out.getvalue() == ""


def test_disabled_bars_print_nothing_and_byte_units_read_like_tqdm():
    b, tick, out = _clocked(10, interval=0.0, step_s=1.0, disable=True)
    for _ in range(10):
        tick()
    b.close()
    assert out.getvalue() == ""
    b, tick, out = _clocked(4 << 20, interval=0.0, step_s=1.0, unit="B", unit_scale=True, unit_divisor=1024)
    tick(4 << 20)
    assert "4.00M/4.00M" in out.getvalue() and "MB/s" in out.getvalue()


def test_bar_is_tqdm_on_a_terminal_and_lines_elsewhere():
    term = bar(3, "x", file=_Terminal())
    assert isinstance(term, tqdm)
    term.close()
    assert isinstance(bar(3, "x", file=io.StringIO()), LineBar)
