"""Wall-time accounting by phase (forward passes, grouping, fitting) for fusion diagnostics."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates seconds per named phase; nested phases are charged to the innermost one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        _sync()
        start = time.perf_counter()
        self._stack.append(phase)
        try:
            yield
        finally:
            _sync()
            elapsed = time.perf_counter() - start
            self._stack.pop()
            self.seconds[phase] += elapsed
            if self._stack:
                self.seconds[self._stack[-1]] -= elapsed

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.seconds.items()}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
