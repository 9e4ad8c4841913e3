"""Wall-clock timing: synchronised stopwatches, side-by-side measurement, robust summaries.

Latency here is what a user waits for one video (batch 1, prompt in, frames out), measured with
``time.perf_counter``. On a GPU the clock is read only after ``torch.cuda.synchronize``: kernels
run asynchronously, and an unsynchronised clock measures how fast work was queued, not done.

Systems are timed side by side (``side_by_side``): warm-up runs first, then repeats that visit
every system once per round, the starting system rotating from round to round. A shared machine
whose speed drifts (other processes, clocks, caches) then slows every system alike instead of
whichever happened to run during the slow minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the queued work of a CUDA ``device`` (no-op on the CPU or for None)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


class Stopwatch:
    """Seconds since ``start()``, read after synchronising ``device``.

    >>> watch = Stopwatch("cpu").start(); ...; seconds = watch.elapsed()
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = device
        self._t0: float | None = None

    def start(self) -> Stopwatch:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def elapsed(self) -> float:
        if self._t0 is None:
            raise RuntimeError("Stopwatch.elapsed() called before start()")
        synchronize(self.device)
        return time.perf_counter() - self._t0


@dataclass(frozen=True)
class TimingSummary:
    """Median and spread of timing samples, in seconds.

    The median and the quartiles (numpy's default linear interpolation) rather than mean and
    standard deviation: timing noise on a shared machine is one-sided (a run can only be slowed
    down), and one slow outlier would move the mean and inflate the deviation.
    """

    n: int
    median: float
    q25: float
    q75: float
    min: float
    max: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples: Sequence[float]) -> TimingSummary:
    """Summarise ``samples`` (seconds, at least one, all finite and >= 0)."""
    values = np.asarray(list(samples), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"summarize needs a non-empty sequence of seconds, got {list(samples)!r}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"timing samples must be finite and >= 0, got {values.tolist()}")
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return TimingSummary(int(values.size), float(median), float(q25), float(q75),
                         float(values.min()), float(values.max()))


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op CPU threads set to ``threads`` (None: unchanged),
    then restore the previous setting, also when the block raises."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"CPU threads={threads!r} must be an integer >= 1, or null to keep "
                         f"torch's setting ({torch.get_num_threads()})")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rotation(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` starting at position ``round_index mod len(names)`` (the visiting order of a
    side-by-side round)."""
    if not names:
        return []
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def side_by_side(
    runs: Mapping[str, Callable[[int], T]],
    warmup: int,
    repeats: int,
    on_run: Callable[[str, int, bool], None] | None = None,
) -> dict[str, list[T]]:
    """Call every ``runs[name](i)`` ``warmup + repeats`` times, interleaved, and collect results.

    Args:
        runs: name -> callable taking the round index (e.g. to pick that round's prompt) and
            returning whatever the caller wants to keep (typically its own timings).
        warmup: rounds whose results are discarded (first calls pay one-off costs: allocator
            growth, kernel selection, lazily built tables).
        repeats: rounds whose results are kept.
        on_run: called after each call with (name, round index, is_warmup), e.g. a progress bar.
    Returns:
        name -> the ``repeats`` results of the measured rounds, in round order.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, "
                         f"repeats={repeats}")
    names = list(runs)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        is_warmup = r < warmup
        for name in rotation(names, r):
            value = runs[name](r)
            if not is_warmup:
                results[name].append(value)
            if on_run is not None:
                on_run(name, r, is_warmup)
    return results
