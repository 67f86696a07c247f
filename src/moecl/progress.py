"""Progress reporting: a tqdm bar on a terminal, plain lines in a file.

Every progress bar of moecl comes from `bar()`. When the output is a terminal it is an ordinary tqdm bar. When it
is not (CI logs, nohup, SLURM output files) tqdm's carriage-return redraws would pile up as fragments, so a
`LineBar` prints whole lines instead, with the same information as the bar (desc, n/total, elapsed, rate,
postfix such as the loss): one line each time the count passes another tenth of the total, but at most one per
`interval` seconds, and a last line when a bar that printed before (or ran `interval` seconds) closes. Short
passes thus print nothing, and a log holds about one line per `interval` seconds of work at most.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm.auto import tqdm

LINE_INTERVAL_S = 10.0  # the least time between two lines of one bar in a file


def is_terminal(file: IO | None = None) -> bool:
    file = sys.stderr if file is None else file
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class LineBar:
    """The subset of tqdm's interface moecl uses (update, set_postfix, close, context manager), as lines."""

    def __init__(
        self,
        total: int | None,
        desc: str | None = None,
        *,
        initial: int = 0,
        unit: str = "it",
        unit_scale: bool = False,
        unit_divisor: int = 1000,
        disable: bool = False,
        file: IO | None = None,
        interval: float = LINE_INTERVAL_S,
        clock=time.monotonic,
    ):
        self.total, self.desc, self.n, self.disable = total, desc, initial, disable
        self.unit, self.unit_scale, self.unit_divisor = unit, unit_scale, unit_divisor
        self.file = file
        self.interval = interval
        self.clock = clock
        self.start = self.last = clock()
        self.initial = initial
        self.postfix = ""
        self.printed = 0
        self._printed_n: int | None = None  # the count of the last line (close does not repeat it)
        self.closed = False
        self._next_tenth = self._tenth(initial) + 1

    def _tenth(self, n: int) -> int:
        return int(10 * n / self.total) if self.total else n // 100  # no total: a line every 100 items

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self._tenth(self.n) < self._next_tenth:
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self._print(now)
        self._next_tenth = self._tenth(self.n) + 1

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:  # noqa: ARG002
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        due = self.printed or now - self.start >= self.interval
        if not self.disable and due and self._printed_n != self.n:
            self._print(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        # tqdm's own statistics text (ncols=0: no bar), so a log line reads like the bar
        return tqdm.format_meter(
            self.n,
            self.total,
            elapsed,
            ncols=0,
            prefix=self.desc or "",
            unit=self.unit,
            unit_scale=self.unit_scale,
            unit_divisor=self.unit_divisor,
            initial=self.initial,
            postfix=self.postfix or None,
        ).strip()

    def _print(self, now: float) -> None:
        file = sys.stderr if self.file is None else self.file
        print(self.line(now), file=file, flush=True)
        self.printed += 1
        self._printed_n = self.n
        self.last = now

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(
    total: int | None,
    desc: str | None = None,
    *,
    disable: bool = False,
    leave: bool = False,
    initial: int = 0,
    file: IO | None = None,
    **kwargs: Any,
):
    """A progress bar writing to `file` (default stderr): tqdm on a terminal, a LineBar otherwise."""
    if is_terminal(file):
        return tqdm(
            total=total, desc=desc, disable=disable, leave=leave, initial=initial, file=file, dynamic_ncols=True, **kwargs
        )
    return LineBar(total, desc, disable=disable, initial=initial, file=file, **kwargs)


def say(msg: str) -> None:
    """A message line on stdout that does not break a bar drawn on the terminal."""
    if is_terminal(sys.stderr):
        tqdm.write(msg)
    else:
        print(msg, flush=True)
