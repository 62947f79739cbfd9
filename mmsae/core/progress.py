"""Progress of long work, on the terminal and in the job's log.

A tqdm bar shows count, rate and ETA on stderr; the same counts go to the logging module (the job's
log file, :func:`mmsae.core.job.setup`) as lines such as
``explain: 120/1000 requests, 3.1/s, ETA 4m40s``, at most every :data:`LOG_EVERY_S` seconds, and a
last line when the work ends (``explain: 1000/1000 requests in 5m20s, 3.1/s``), so a log read after
the job, or while it runs on a cluster node, tells how far it got.

:func:`gather` runs awaitables concurrently (tqdm's asyncio ``gather``) and returns their results
in order; :func:`track` wraps a loop's iterable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm
from tqdm.asyncio import tqdm_asyncio

LOG_EVERY_S = 30.0
"""Seconds between two progress lines in the log (the first comes after this long, the last at the end)."""

T = TypeVar("T")
log = logging.getLogger("mmsae.progress")


def duration(seconds: float) -> str:
    """``42s``, ``4m40s`` or ``2h05m``: a duration for a log line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLog:
    """Counts finished items and writes them to the log: at most every ``every_s`` seconds while
    work goes on, and once at :meth:`close`.

    Args:
        label: what is done (``explain``, ``score``, ...); the line's first word.
        total: items to do (None when unknown: no ETA).
        unit: the items' name, plural (``requests``).
        every_s: seconds between lines; None = :data:`LOG_EVERY_S`; 0 = a line per item.
        logger: where the lines go (default ``mmsae.progress``).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, label: str, total: int | None, unit: str = "items", every_s: float | None = None,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.log, self.clock = logger or log, clock
        self.done, self.closed = 0, False
        self.t0 = self.last = clock()

    def rate(self) -> float | None:
        """Items per second so far (None before any time has passed)."""
        dt = self.clock() - self.t0
        return self.done / dt if dt > 0 else None

    def line(self) -> str:
        """``label: done/total unit, rate/s, ETA ...`` (the total and ETA left out when unknown)."""
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.label}: {count} {self.unit}"]
        rate = self.rate()
        if rate:
            parts.append(f"{rate:.3g}/s")
            if self.total is not None:
                parts.append(f"ETA {duration(max(self.total - self.done, 0) / rate)}")
        return ", ".join(parts)

    def update(self, n: int = 1) -> None:
        """``n`` more items done; log a line when ``every_s`` has passed since the last one."""
        self.done += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s", self.line())

    def close(self) -> None:
        """Log the last line once: ``label: done/total unit in <elapsed>, rate/s``."""
        if self.closed:
            return
        self.closed = True
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        rate = self.rate()
        self.log.info("%s: %s %s in %s%s", self.label, count, self.unit, duration(self.clock() - self.t0),
                      f", {rate:.3g}/s" if rate else "")


def track(iterable: Iterable[T], label: str, total: int | None = None, unit: str = "items", every_s: float | None = None,
          logger: logging.Logger | None = None, bar: bool = True) -> Iterator[T]:
    """Iterate ``iterable`` with a tqdm bar and :class:`ProgressLog` lines; ``total`` defaults to its
    ``len`` when it has one. The last line is logged when the loop ends, however it ends."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    progress = ProgressLog(label, total, unit, every_s, logger)
    try:
        for item in tqdm(iterable, desc=label, unit=unit.rstrip("s") or unit, total=total, disable=not bar, mininterval=1.0):
            yield item
            progress.update()
    finally:
        progress.close()


async def gather(aws: Iterable[Awaitable[T]], label: str, unit: str = "requests", every_s: float | None = None,
                 logger: logging.Logger | None = None, bar: bool = True) -> list[T]:
    """Await ``aws`` concurrently and return their results in order (as :func:`asyncio.gather`), with
    tqdm's asyncio bar and :class:`ProgressLog` lines counting each one as it finishes.

    Raises:
        Exception: the first exception an awaitable raised (the others are not cancelled)."""
    aws = list(aws)
    progress = ProgressLog(label, len(aws), unit, every_s, logger)

    async def counted(aw: Awaitable[T]) -> T:
        try:
            return await aw
        finally:
            progress.update()

    try:
        return await tqdm_asyncio.gather(*(counted(a) for a in aws), total=len(aws), desc=label,
                                         unit=unit.rstrip("s") or unit, disable=not bar, mininterval=1.0)
    finally:
        progress.close()
