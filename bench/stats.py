"""Repetition and summary: warm up, repeat, report median and spread."""

import statistics
import time
from dataclasses import dataclass


@dataclass
class Sample:
    """Repeated measurements of one thing, in one unit."""
    values: list
    unit: str

    @property
    def median(self):
        return statistics.median(self.values)

    @property
    def spread(self):
        """(min, max) of the repetitions."""
        return min(self.values), max(self.values)

    def percentile(self, p):
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    def __str__(self):
        low, high = self.spread
        return f"{self.median:.1f} {self.unit} ({low:.1f}–{high:.1f})"


def repeat(action, repetitions, warmup=1):
    """Milliseconds per call of ``action``, after ``warmup`` unmeasured calls."""
    for _ in range(warmup):
        action()
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        action()
        times.append(1000 * (time.perf_counter() - started))
    return Sample(times, "ms")
