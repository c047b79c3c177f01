"""Progress a person can follow: one line per stage, a rich bar on a terminal, plain log lines elsewhere.

A demo trains seven adapters and evaluates them; an evaluation of a few thousand routing examples
takes minutes on a CPU. Without a sign of life either looks hung, and the trainer's own output (a
raw `{'loss': ...}` dictionary every few steps, several libraries' tqdm bars) says neither how far
along it is nor how long is left. On a terminal (stderr is a TTY) each stage gets one `rich.progress`
line: what it is (`[3/9] expert timer`), done/total, a status such as the loss, time spent and
left. In CI, Modal logs or a redirected file a bar would be noise, so a plain INFO log line is
written each time another tenth is done (and at the end).
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Progress:
    """Count finished items out of `total`: `with Progress("router", n) as p: ... p.advance()`.

    `bar=None` picks the rich bar when stderr is a terminal, log lines otherwise."""

    def __init__(self, description: str, total: int, bar: bool | None = None, steps: int = 10,
                 logger: logging.Logger | None = None):
        self.description = description
        self.total = max(0, int(total))
        self.done = 0
        self.status = ""  # e.g. "loss 0.312": shown after the count
        self.bar = sys.stderr.isatty() if bar is None else bar
        self.steps = max(1, steps)
        self.log = logger or log
        self._next_step = 1
        self._started = 0.0
        self._rich: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        self._started = time.perf_counter()
        if self.bar and self.total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                      TextColumn("left"), TimeRemainingColumn(), console=Console(stderr=True))
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total, status=self.status)
        return self

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.update(self.done + n, status)

    def update(self, done: int, status: str | None = None) -> None:
        """Set the count (a trainer resumed from a checkpoint starts past 0) and the status text."""
        self.done = done
        if status is not None:
            self.status = status
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, status=self.status)
            return
        if not self.total:
            return
        reached = self.done * self.steps // self.total  # how many tenths are complete
        if reached >= self._next_step:
            self._next_step = reached + 1
            elapsed = time.perf_counter() - self._started
            left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            self.log.info("%s: %d/%d (%d%%)%s, %s spent, %s left", self.description, self.done, self.total,
                          100 * self.done // self.total, f", {self.status}" if self.status else "",
                          clock(elapsed), clock(left))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def clock(seconds: float) -> str:
    """`75.2` -> `1:15`: durations in the form people read."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


async def gather_limited(jobs: Sequence[Callable[[], Awaitable[T]]], concurrency: int = 16,
                         description: str = "", bar: bool | None = None) -> list[T]:
    """Run `jobs` (each a no-argument coroutine function) at most `concurrency` at a time, so the
    engine can batch them without being flooded; results come back in input order. With a
    `description`, show its progress (see `Progress`)."""
    gate = asyncio.Semaphore(max(1, concurrency))
    progress = Progress(description, len(jobs) if description else 0, bar=bar if description else False)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            result = await job()
        progress.advance()
        return result

    with progress:
        tasks = [asyncio.ensure_future(one(job)) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # one failed (or we were cancelled): do not leave the others running
            for task in tasks:
                task.cancel()
            raise
