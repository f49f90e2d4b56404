"""Per-phase wall-clock accounting (exclusive time: a nested phase is not counted in its parent)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, synchronize: bool = False):
        # On CUDA, kernels run asynchronously; synchronising at phase edges charges them to their phase.
        self.synchronize = synchronize and torch.cuda.is_available()
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []
        self._last = time.perf_counter()

    def _switch(self):
        if self.synchronize:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._stack:
            self.totals[self._stack[-1]] += now - self._last
        self._last = now

    @contextmanager
    def phase(self, name: str):
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def summary(self, total_seconds: float, steps: int) -> dict:
        """Seconds and share per phase; 'other' is everything outside a named phase."""
        named = sum(self.totals.values())
        rows = dict(self.totals)
        rows["other"] = max(total_seconds - named, 0.0)
        return {
            "total_seconds": total_seconds,
            "steps": steps,
            "seconds_per_step": total_seconds / max(steps, 1),
            "phases": {
                k: {"seconds": v, "share": v / total_seconds if total_seconds else 0.0} for k, v in rows.items()
            },
        }


def format_summary(summary: dict) -> str:
    lines = [
        f"timing: {summary['steps']} steps in {summary['total_seconds']:.1f}s ({1000 * summary['seconds_per_step']:.1f} ms/step)"
    ]
    for name, row in sorted(summary["phases"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"  {name:<12} {row['seconds']:9.2f}s  {100 * row['share']:5.1f}%")
    return "\n".join(lines)
