"""Named export steps, timed: where an export's minutes go, for the report's step table.

`export_bundle` runs every stage inside `step(name)` so the CLI can draw progress; a
`StepClock` wraps that hook (or none) and also records each step's wall time, so the bundle
says what took long without anyone re-running it under a profiler.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from typing import Any

StepHook = Callable[[str], AbstractContextManager[Any]]
_ACTIVE: ContextVar[StepHook | None] = ContextVar("edgelm_active_steps", default=None)


@contextmanager
def active_steps(hook: StepHook) -> Iterator[None]:
    """Make `hook` the one `phase` reports to while the block runs (an export's StepClock)."""
    token = _ACTIVE.set(hook)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def phase(name: str) -> AbstractContextManager[Any]:
    """A named part of a long step — an exporter's quantization, graph capture, lowering,
    serialization — as a step nested in the one that runs it: a row of the report's step table
    and a line of the CLI's progress. Exporters call it without knowing who listens; outside an
    export (a direct exporter call) it does nothing."""
    hook = _ACTIVE.get()
    return nullcontext() if hook is None else hook(name)


@dataclass(frozen=True)
class StepTime:
    step: str
    seconds: float
    depth: int = 0  # 1 for a step run inside another (its time is also in the outer step's)
    background: bool = False  # ran in a second process beside the other steps (not in the total)
    peak_rss_mb: float | None = None  # this process's (or the background worker's) peak while the step ran
    # of the resident memory at the step's end, how much was memory-mapped files (the safetensors
    # source weights, a GGUF being measured): counted in RSS, but pages the kernel can drop and
    # read again, unlike the copies edgelm makes
    file_backed_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reset_peak_rss() -> bool:
    """Start a new high-water mark of this process's resident memory (Linux's clear_refs "5").
    False where the kernel offers no reset: then peak_rss_mb() is the peak since the process began."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand memory the previous step freed back to the kernel (glibc's malloc_trim). glibc keeps
    freed heap in its arenas; after a step that held a 1B model's logits or a second copy of its
    weights, the next step would otherwise start (and peak) that much higher. No-op off glibc."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_mb(field: str) -> float | None:
    """One memory field of this process's /proc/self/status (e.g. "VmHWM"), in MB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def file_backed_mb() -> float | None:
    """This process's resident memory that is mapped from files (Linux RssFile), MB; None elsewhere."""
    return _status_mb("RssFile")


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset_peak_rss (or since it began), MB.
    VmHWM, not getrusage: ru_maxrss is inherited across fork+exec, so a worker started by a big
    parent would report the parent's peak. (The reset also lowers what getrusage and
    `/usr/bin/time` report afterwards: read an export's peaks from its step table.)"""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1024), 1)


class StepClock:
    """A step hook that times every step and passes it on to `hook` (the CLI's progress display).

    `note` is forwarded too, so long steps keep their live detail.
    """

    def __init__(self, hook: StepHook | None = None) -> None:
        self._hook = hook or (lambda _name: nullcontext())
        self._open = 0
        self._inner_peaks: list[float] = []  # per open step: its peak before its latest inner step's reset
        self.times: list[StepTime] = []
        if hasattr(hook, "note"):
            self.note = hook.note  # type: ignore[union-attr]

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, depth = time.perf_counter(), self._open
        self._open += 1
        if self._inner_peaks:  # the reset below forgets the outer step's peak so far: keep it
            self._inner_peaks[-1] = max(self._inner_peaks[-1], peak_rss_mb())
        self._inner_peaks.append(0.0)
        release_freed_memory()
        reset_peak_rss()
        try:
            with self._hook(name):
                yield
        finally:
            self._open -= 1
            peak = max(peak_rss_mb(), self._inner_peaks.pop())
            if self._inner_peaks:
                self._inner_peaks[-1] = max(self._inner_peaks[-1], peak)
            seconds = round(time.perf_counter() - start, 2)
            self.times.append(StepTime(name, seconds, depth, peak_rss_mb=peak, file_backed_mb=file_backed_mb()))

    def record_background(
        self, name: str, seconds: float, peak_rss: float | None = None, phases: list[StepTime] | None = None
    ) -> None:
        """A step that ran in another process (edgelm.background), beside the steps timed here,
        after the phases that process timed inside it (one level deeper; as with steps timed
        here, an inner step is listed before the step it ran in)."""
        self.times += [replace(inner, depth=inner.depth + 1, background=True) for inner in phases or []]
        self.times.append(StepTime(name, round(seconds, 2), background=True, peak_rss_mb=peak_rss))

    def peak_rss_mb(self) -> float | None:
        """The highest peak of any step recorded (this process's or a background worker's)."""
        peaks = [t.peak_rss_mb for t in self.times if t.peak_rss_mb is not None]
        return max(peaks) if peaks else None

    def total_s(self) -> float:
        return round(sum(t.seconds for t in self.times if t.depth == 0 and not t.background), 2)

    def to_list(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.times]
