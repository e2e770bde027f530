"""Shared pieces of the GPU benchmarks: a hard time budget, timers, and results written after every row.

Nothing here imports the project; ``benchmarks/attention.py`` and ``benchmarks/gpu_check.py`` use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable


class BudgetExceeded(Exception):
    """Raised inside a guarded step once the benchmark's time budget is spent."""


class Budget:
    """A wall-clock budget that also bounds compiles.

    ``guard()`` arms SIGALRM for the time left, so a step stuck in Python (torch.compile, Triton autotuning, a long
    timing loop) is interrupted with BudgetExceeded at the deadline. Work inside a C call is interrupted when it
    returns to Python; for anything that never returns, ``start_watchdog`` ends the process ``grace_s`` after the
    deadline (rows already written stay on disk).
    """

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextlib.contextmanager
    def guard(self):
        if self.left() <= 0:
            raise BudgetExceeded("time budget spent before this step started")
        use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        if not use_alarm:
            yield
            return

        def on_alarm(signum, frame):
            raise BudgetExceeded("time budget spent during this step")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def start_watchdog(self, grace_s: float, on_expiry: Callable[[], None]) -> None:
        def watch() -> None:
            while self.left() + grace_s > 0:
                time.sleep(min(1.0, max(self.left() + grace_s, 0.01)))
            try:
                on_expiry()
            finally:
                os._exit(124)

        threading.Thread(target=watch, daemon=True).start()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU) after ``warmup`` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mb(fn: Callable[[], Any], device) -> float:
    """Peak memory above what was allocated before one call of ``fn`` (CUDA only; NaN on CPU)."""
    import torch

    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200].replace("\n", " ").replace("|", "/")


class Results:
    """Rows and metadata, rewritten to ``<stem>.json`` and ``<stem>.md`` after every change (atomic replace), so a
    killed run leaves everything measured so far."""

    def __init__(self, folder: str | os.PathLike, stem: str, meta: dict, render: Callable[["Results"], list[str]]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stem, self.meta, self.render = stem, meta, render
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.write()

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.write()

    def write(self) -> None:
        payload = {"meta": self.meta, "rows": self.rows, "notes": self.notes}
        self._replace(self.folder / f"{self.stem}.json", json.dumps(payload, indent=1, default=str))
        self._replace(self.folder / f"{self.stem}.md", "\n".join(self.render(self)) + "\n")

    @staticmethod
    def _replace(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
