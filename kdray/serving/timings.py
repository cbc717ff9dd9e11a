"""Named durations of one request, sent back as a standard ``Server-Timing`` header.

The Gateway's prediction and explanation routes mark each part (reading the body, decoding, the
model) as it ends; browsers' devtools show the header and the benchmarks read it.
"""

from __future__ import annotations

import time

__all__ = ["Timings"]


class Timings:
    """Named durations of one request, sent back as a standard ``Server-Timing`` header
    (browsers' devtools show it; the benchmark reads it)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._last = self.started
        self.parts: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        """Close the part that ran since the previous mark (or the start)."""
        now = time.perf_counter()
        self.parts.append((name, (now - self._last) * 1e3))
        self._last = now

    @property
    def total_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1e3

    def header(self) -> str:
        return ", ".join(
            f"{name};dur={ms:.2f}" for name, ms in [*self.parts, ("total", self.total_ms)]
        )
