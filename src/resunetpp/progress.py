"""Progress bars that behave in logs: tqdm on a terminal, a plain line every `LOG_EVERY_S` seconds elsewhere.

tqdm redraws its bar with carriage returns many times a second; written to a file or a CI log that
is one endless line. `progress_bar(...)` takes tqdm's arguments and, when stderr is not a terminal,
prints `desc: n/total unit (p%)` at most every `LOG_EVERY_S` seconds, and once at the end.
`RESUNETPP_PROGRESS=tty|log|off` forces one behaviour.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_EVERY_S = 30.0


def _mode() -> str:
    forced = os.environ.get("RESUNETPP_PROGRESS", "").lower()
    if forced in ("tty", "log", "off"):
        return forced
    stream = sys.stderr
    return "tty" if hasattr(stream, "isatty") and stream.isatty() else "log"


class LogProgress:
    """The tqdm subset this package uses (update, close, context manager, iteration, write)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
                 unit: str = "it", disable: bool = False, every: float = LOG_EVERY_S, initial: int = 0,
                 **_: Any):
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        self.disable, self.every = disable, every
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, initial
        self._last = time.monotonic()
        self._closed = False

    def _line(self) -> str:
        if self.total:
            return f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        return f"{self.desc}: {self.n} {self.unit}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.every:
            self._last = now
            print(self._line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self._closed and not self.disable and self.n:
            print(self._line(), file=sys.stderr, flush=True)
        self._closed = True

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    @staticmethod
    def write(message: str, file=None) -> None:
        print(message, file=file or sys.stdout, flush=True)


def progress_bar(iterable: Iterable | None = None, **kwargs: Any):
    """tqdm(iterable, **kwargs) on a terminal; `LogProgress` otherwise (see the module docstring)."""
    mode = _mode()
    if mode == "off":
        kwargs["disable"] = True
    if mode == "tty":
        return tqdm(iterable, **kwargs)
    return LogProgress(iterable, **kwargs)
