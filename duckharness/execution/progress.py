"""A small progress bar for long runs: shown on a terminal, silent otherwise or when asked."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """Counts finished units of work and redraws one line on ``stream`` (stderr by default).

    ``enabled=None`` shows the bar only when the stream is a terminal.
    """

    def __init__(self, total: int, label: str, *, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.label = label
        self.done = 0
        self.enabled = (self.stream.isatty() if enabled is None else enabled) and total > 1
        self._lock = threading.Lock()
        self._start = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self.enabled:
                self._draw()

    def _draw(self) -> None:
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self._start
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
