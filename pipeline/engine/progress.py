"""Progress of long stage work: tqdm bars with a rate and an estimate, readable in a log too.

A stage runs as a child whose output is a pipe (never a terminal), teed by the runner to the
console and the entry's log.txt. So the child cannot ask tqdm whether it draws on a terminal;
the runner says how often to report (KILN_PROGRESS_INTERVAL, seconds): often on a terminal,
seldom in CI logs. Each report is one line (tqdm's `\\r` becomes a newline in the log), and the
first and the last report always print, so even a quick run leaves `n/N [elapsed<left, rate]`.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
INTERVAL_ENV = "KILN_PROGRESS_INTERVAL"
TERMINAL_INTERVAL, LOG_INTERVAL = 1.0, 30.0


def interval() -> float:
    try:
        return max(0.1, float(os.environ.get(INTERVAL_ENV, LOG_INTERVAL)))
    except ValueError:
        return LOG_INTERVAL


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    """`items`, reporting `desc: n/N unit [elapsed<left, rate]` as they are consumed."""
    yield from bar(desc, unit, total, items)


def bar(desc: str, unit: str, total: int | None, items: Iterable[T] | None = None, scale: bool = False) -> Any:
    """The tqdm bar `progress` uses, for work counted by `.update(n)` (bytes: `scale=True`)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, file=sys.stdout, mininterval=interval(),
                maxinterval=interval(), ascii=True, ncols=100, dynamic_ncols=False, leave=True, unit_scale=scale)
