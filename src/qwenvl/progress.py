"""How a long command shows its progress: a bar on a terminal, else a line now and then.

The library reports through callbacks and `logging`; the command-line front ends (`qwenvl
finetune`, `qwenvl eval`) turn that into what a person sees, with `Progress` and `show_logs`.
A log file or a CI job gets plain lines, each with the time spent and an estimate of the rest.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO


def format_duration(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """`total` units of work, of which `initial` were done before (a resumed run).

    With `bar` (default: when `stream` is a terminal), a tqdm bar shows the count, the rate and the
    time left. Otherwise a line goes to `stream` whenever the count reaches a multiple of `every`,
    and at the last unit: the label, the count, the caller's note, the time spent and the time
    left at the rate of this run so far.
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        initial: int = 0,
        every: int = 10,
        unit: str = "step",
        stream: TextIO | None = None,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.total, self.label, self.every = total, label, every
        self.done = self.initial = initial
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.started = clock()
        self._bar = None
        if is_terminal(self.stream) if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=label, unit=unit, file=self.stream, dynamic_ncols=True
            )

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float | None:
        """Seconds left at this run's rate so far; None before the first unit."""
        done_here = self.done - self.initial
        if done_here <= 0:
            return None
        return (self.total - self.done) * self.elapsed / done_here

    def update(self, n: int = 1, note: str = "") -> None:
        """`n` more units done; `note` (such as the loss) is shown beside the count."""
        self.done += n
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        elif self.done % self.every == 0 or self.done >= self.total:
            self.write(self.line(note))

    def line(self, note: str = "") -> str:
        parts = [f"{self.label} {self.done}/{self.total}"]
        if note:
            parts.append(note)
        timing = f"{format_duration(self.elapsed)} elapsed"
        remaining = self.remaining()
        if self.done < self.total and remaining is not None:
            timing += f", {format_duration(remaining)} left"
        return " ".join(parts) + " | " + timing

    def write(self, text: str) -> None:
        """A message line that leaves the bar intact below it."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _LineHandler(logging.Handler):
    def __init__(self, write: Callable[[str], None]):
        super().__init__()
        self._write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            self._write(prefix + record.getMessage())
        except Exception:
            self.handleError(record)


@contextmanager
def show_logs(
    write: Callable[[str], None], name: str = "qwenvl", level: int = logging.INFO
) -> Iterator[None]:
    """Within the block, records of logger `name` at `level` and above go to `write` as plain lines
    (warnings prefixed "warning: "), whether or not the process configured logging."""
    logger = logging.getLogger(name)
    handler = _LineHandler(write)
    handler.setLevel(level)
    previous = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
