"""Progress for long work: tqdm's bar on a terminal, plain lines elsewhere.

Redirected to a file or a CI log, a tqdm bar is thousands of carriage returns on one line. There,
:func:`progress` prints whole lines instead: one when the work starts, then at most one every
:data:`LINE_SECONDS` (each with the count, the rate and the current step's label), and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

LINE_SECONDS = 2.0


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stderr, where progress goes) is an interactive terminal."""
    s = stream if stream is not None else sys.stderr
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


class LineProgress:
    """The part of tqdm's interface that sinkscope uses (``update``, ``set_postfix_str``, a context manager),
    printing whole lines (module docstring)."""

    def __init__(self, total: int, desc: str, unit: str, stream: IO[str] | None = None,
                 every: float = LINE_SECONDS) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()
        self._line("started")

    def _line(self, note: str = "") -> None:
        secs = time.monotonic() - self.start
        rate = f", {self.n / secs:.1f} {self.unit}/s" if self.n and secs > 0 else ""
        what = f" [{self.postfix}]" if self.postfix else ""
        tail = f" {note}" if note else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s, {secs:.0f} s{rate}{what}{tail}", file=self.stream,
              flush=True)
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every and self.n < self.total:
            self._line()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        self._line("done")

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(total: int, desc: str, unit: str, *, enabled: bool = True, stream: IO[str] | None = None) -> Any:
    """A progress reporter for ``total`` steps: nothing when not ``enabled``, tqdm's bar on a terminal, else
    :class:`LineProgress`. Use it as a context manager; call ``update(n)`` per step."""
    if not enabled:
        return _Silent()
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=stream)
    return LineProgress(total, desc, unit, stream)
