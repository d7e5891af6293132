"""Wall-clock and CPU seconds of a pipeline's phases (the demo's and the ablation's progress lines)."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator


class Timer:
    """Wall-clock and CPU seconds (this process, all threads) of each phase, printed as it ends. On a busy
    machine the CPU seconds tell what the phase costs better than the wall clock."""

    def __init__(self, echo: Callable[[str], None] = print):
        self.phases: dict[str, dict[str, float]] = {}
        self._echo = echo
        self._start = time.perf_counter()
        self._cpu = cpu_seconds()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, str]]:
        note: dict[str, str] = {}
        start = time.perf_counter()
        yield note
        self.record(name, time.perf_counter() - start, note.get("text", ""))

    def record(self, name: str, seconds: float, text: str = "") -> None:
        cpu = cpu_seconds()
        self.phases[name] = {"wall": round(seconds, 2), "cpu": round(cpu - self._cpu, 2) if seconds else 0.0}
        self._cpu = cpu
        clock = f"{time.perf_counter() - self._start:5.0f}s"
        self._echo(f"[{clock}] {name:<30} {seconds:6.1f}s (cpu {self.phases[name]['cpu']:6.1f}s)  {text}".rstrip())


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
