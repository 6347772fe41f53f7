"""Timers and memory meters: one-thread CPU time or CUDA events, the allocator's peak.

* Time. CPU: ``time.process_time()`` of this process (with ``torch.set_num_threads(1)``, the
  default of the suite: CPU time held to about ±10% on a shared 2-core VM where 2-thread wall time
  moved 3-70x). CUDA: ``torch.cuda.Event`` pairs with ``torch.cuda.synchronize()`` before the
  start and after the end, so every kernel a call launched is inside its interval. Wall time
  (``perf_counter``) is recorded beside either.
* Memory: the allocator's peak *above what was live before the call*. CUDA:
  ``torch.cuda.max_memory_allocated() - memory_allocated()`` after ``reset_peak_memory_stats()``.
  CPU: the allocator events of ``torch.profiler.profile(profile_memory=True)``, summed in time
  order (a block allocated before the window and freed inside it counts negative, as it should).
  Never the process's RSS (~300 MiB of interpreter and libraries hide the ratios).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


@dataclasses.dataclass
class Sample:
    """One timed call: seconds on the benchmark's clock (CPU time or CUDA events), and wall."""

    seconds: float
    wall: float


class Timer:
    """Times one call on ``device``: CUDA events with synchronisation, or this process's CPU time
    (``clock="cpu"``, the CPU default) or wall time (``clock="wall"``)."""

    def __init__(self, device: torch.device, clock: str = "cpu") -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.clock = "cuda-events" if self.cuda else clock
        if self.clock not in ("cuda-events", "cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], Any]) -> tuple[Sample, Any]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            w0 = time.perf_counter()
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(self.device)
            wall = time.perf_counter() - w0
            return Sample(start.elapsed_time(end) / 1e3, wall), out
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        c1, w1 = time.process_time(), time.perf_counter()
        return Sample(c1 - c0 if self.clock == "cpu" else w1 - w0, w1 - w0), out


@dataclasses.dataclass
class Window:
    """What one measured call did to the allocator: ``peak`` bytes above what was live when it
    started, and ``net`` bytes still live at its end that were not before (may be negative). On CPU
    both are filled in when the :meth:`Memory.session` they were measured in ends."""

    peak: int = 0
    net: int = 0


class Memory:
    """The allocator's view of calls (see the module docstring).

    CPU: every measurement happens inside one :meth:`session`, a single profiler run, and each
    call is marked with ``record_function``; when the session ends, the allocator events are
    summed in time order and read at each mark. The profiler cannot size the release of a block
    allocated before it started, so run the calls once inside the session before measuring them
    (``.grad`` tensors, optimiser states and caches are then reallocated under its eyes).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.metric = (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before"
            if self.cuda
            else "torch.profiler CPU allocator events (profile_memory=True), running sum in time order, "
            "one profiler session with every call run once before it is measured"
        )
        self._pending: list[tuple[str, Window]] = []
        self._active = False

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The context every measurement must be made in (a profiler run on CPU)."""
        if self.cuda:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        self._pending, self._active = [], True
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                yield
        finally:
            self._active = False
        assert prof.profiler is not None
        # the raw events; key_averages() would give sums ~100x slower and without their order
        events = prof.profiler.kineto_results.events()
        marks = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("hgmem#")}
        mem = sorted((e.start_ns(), int(e.nbytes())) for e in events if e.name() == "[memory]")
        times = [t for t, _ in mem]
        live, acc = [], 0
        for _, b in mem:
            acc += b
            live.append(acc)
        for name, win in self._pending:
            t0, t1 = marks[name]
            i0, i1 = bisect.bisect_left(times, t0), bisect.bisect_right(times, t1)
            base = live[i0 - 1] if i0 > 0 else 0
            inside = live[i0:i1]
            win.peak = max(0, max(inside, default=base) - base)
            win.net = (live[i1 - 1] if i1 > 0 else 0) - base
        self._pending = []

    def __call__(self, fn: Callable[[], Any]) -> tuple[Window, Any]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            out = fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - before
            return Window(peak, torch.cuda.memory_allocated(self.device) - before), out
        if not self._active:
            raise RuntimeError("Memory: measure inside `with memory.session():`")
        win = Window()
        name = f"hgmem#{len(self._pending)}"
        with torch.profiler.record_function(name):
            out = fn()
        self._pending.append((name, win))
        return win, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def rounds(repeats: int, budget_s: float, min_repeats: int = 2) -> Any:
    """Yields round indices: ``repeats`` at most, at least ``min(min_repeats, repeats)``, and none
    started after ``budget_s`` seconds (wall) of rounds."""
    t0 = time.perf_counter()
    for i in range(repeats):
        if i >= min(min_repeats, repeats) and time.perf_counter() - t0 > budget_s:
            return
        yield i
