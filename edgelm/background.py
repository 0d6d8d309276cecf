"""Artifacts exported in worker processes while the export goes on with the others.

ExecuTorch's XNNPACK lowering and litert-torch's TFLite conversion are single-threaded Python
(fake-tensor re-traces in every pass): on the default model they were 60% of the export's
wall time while one of two cores sat idle. `BackgroundExport` hands such an artifact's first
recipe to a worker process at the start of the export and collects the file when the
artifact's turn comes; everything else (the other formats' exports, calibration, parity)
runs beside it.

Timing must not suffer from the overlap: `paused()` stops the worker (SIGSTOP) while an
artifact is profiled or run in its vendor runtime, so every tok/s in the report is measured
on a machine doing nothing else, as before. The worker dies with the export: it is killed
when the export ends or fails, and by the kernel if the export process is killed (Linux
PR_SET_PDEATHSIG), so no orphan writes into a bundle folder after its owner is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

from edgelm.errors import EdgeLMError, ExportError
from edgelm.steps import StepClock, active_steps, peak_rss_mb

# The worker holds its own copy of the model plus the lowering's graphs, and the export process
# itself grows while the worker runs (calibrated copies, GPTQ statistics, the other formats'
# sessions): measured on Qwen2.5-0.5B (1.98 GB of fp32 weights), the ExecuTorch worker peaked at
# 9.6 GB (4.8x), the TFLite one at 6.2 GB (3.1x), and the export process grew from 2.2 to
# 12.8 GB (5.4x more). A worker is started only when the memory available now holds all of
# that for every worker; otherwise the artifact is exported in the export process, in turn (the
# kernel killed an ExecuTorch worker of that run when both workers ran).
MEMORY_FACTOR = 5
EXPORT_GROWTH = 5.5
MEMORY_HEADROOM = 1.5 * 2**30
# below this size the worker's start (saving the model, importing torch and the exporter: ~15 s
# on 2 cores) costs more than the overlap saves (a tiny test model lowers in ~20 s)
MIN_PARAMETERS = 50_000_000
POLL_SECONDS = 0.25  # how often the export looks whether a worker has finished, while it has nothing else to do


def worth_a_second_process(model: Any, workers: int = 1) -> bool:
    """Whether `model` is big enough to gain from background exports, and `workers` copies of
    it with their lowerings fit in the memory available now."""
    count = sum(p.numel() for p in model.parameters())
    return count >= MIN_PARAMETERS and memory_holds(model, workers * MEMORY_FACTOR + EXPORT_GROWTH)


def memory_holds(model: Any, times_the_weights: float) -> bool:
    """Whether the memory available now holds `times_the_weights` times `model`'s weight bytes
    with MEMORY_HEADROOM to spare: the rule for every extra copy an export may make."""
    import psutil

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return psutil.virtual_memory().available > times_the_weights * weights + MEMORY_HEADROOM


def _killed_by(number: int) -> str:
    """What ended a worker killed by signal `number`, in words."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number == signal.SIGKILL:
        return f"killed ({name}; most often the kernel's out-of-memory killer: the machine ran out of memory)"
    return f"ended by {name}"


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (a killed export leaves no orphan)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _work(job_file: Path) -> None:
    """The worker process: load the job its parent saved, export, save the outcome beside it."""
    import torch

    from edgelm.export import _export_one
    from edgelm.exporter import get_exporter

    torch.set_num_threads(1)  # the lowering is single-threaded; the other core is the export's
    job = torch.load(job_file, weights_only=False)  # written by our parent a moment ago
    job_file.unlink()
    os.nice(job["nice"])
    start = time.perf_counter()
    clock = StepClock()  # the exporter's phases, timed here and handed back with the file
    try:
        with active_steps(clock):
            artifact = _export_one(
                get_exporter(job["format"]),
                job["model"],
                job["source"],
                Path(job["work"]),
                job["quant"],
                job["name"],
                **job["settings"],
            )
        outcome: tuple[str, Any, float, float | None, list[Any]] = (
            "ok",
            artifact,
            time.perf_counter() - start,
            peak_rss_mb(),
            clock.times,
        )
    except EdgeLMError as err:
        outcome = ("error", err, 0.0, None, [])
    torch.save(outcome, job_file.with_suffix(".result"))


class BackgroundExport:
    """One artifact being exported by a worker process (`python -m edgelm.background JOB`); owns
    that process and its two scratch files in the bundle being built.

    A subprocess rather than multiprocessing: spawn re-imports the caller's `__main__`, which
    would make every script that calls `export_bundle` need an `if __name__ == "__main__"` guard.
    """

    def __init__(
        self,
        model: Any,
        fmt: str,
        source: Any,
        work: Path,
        quant: str,
        name: str,
        settings: dict[str, Any] | None = None,
        nice: int = 19,
    ) -> None:
        """`settings`: the exporter's keyword arguments (GPTQ's layer statistics, ...); `nice`: the
        worker's niceness (the exporter's `background_nice`)."""
        import torch

        self.name = name
        self._job = work / f".background-{name}.job"
        self._result = self._job.with_suffix(".result")
        self._log = self._job.with_suffix(".log")
        torch.save(
            {
                "model": model,
                "format": fmt,
                "source": source,
                "work": str(work),
                "quant": quant,
                "name": name,
                "settings": settings or {},
                "nice": nice,
            },
            self._job,
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the modules we run with
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "edgelm.background", str(self._job)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        # not start_new_session: a new session is a new scheduler autogroup, where the worker's
        # nice would only rank it against itself and it would take a full core from the export
        self._paused = False

    def _last_error(self) -> str:
        """The worker's last log line that is not a warning (torch prints many), as ": line"."""
        lines = self._log.read_text(errors="replace").strip().splitlines() if self._log.is_file() else []
        lines = [line for line in lines if line.strip() and "Warning" not in line and not line.startswith("W1")]
        return f": {lines[-1][:300]}" if lines else ""

    def result(self) -> tuple[Any, float, float | None, list[Any]]:
        """Wait for the worker: (the ExportedArtifact, the worker's seconds, its peak resident
        memory in MB, the phases it timed as StepTimes). Re-raises its EdgeLMError."""
        import torch

        self.resume()
        try:
            code = self._process.wait()
            if not self._result.is_file():
                if code > 0:  # a Python exception escaped the worker: a bug of edgelm's (exit 3), not of the input
                    raise RuntimeError(
                        f"{self.name}: the background export process failed (exit code {code}{self._last_error()})"
                    )
                raise ExportError(
                    f"{self.name}: the background export process was {_killed_by(-code)}; "
                    "--no-background exports it in this process"
                )
            status, value, seconds, peak, phases = torch.load(self._result, weights_only=False)  # our worker's
        finally:
            self.close()
        if status == "error":
            raise value
        return value, seconds, peak, phases

    def finished(self) -> bool:
        """Whether the worker has exited (its outcome is ready for `result`)."""
        return self._process.poll() is not None

    def pause(self) -> None:
        if self._process.poll() is None and not self._paused:
            self._signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._signal(signal.SIGCONT)
            self._paused = False

    def _signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._process.pid, number)

    def close(self) -> None:
        """Stop the worker if it still runs (the export failed or ended early), reap it, and
        remove its scratch files."""
        if self._process.poll() is None:
            self.resume()
            self._process.kill()
        self._process.wait()
        for path in (self._job, self._result, self._log):
            path.unlink(missing_ok=True)


class BackgroundExports:
    """The export's background artifacts, by the caller's key (ArtifactBuilder: format and
    recipe attempt); `paused()` stops them all while something is timed."""

    def __init__(self) -> None:
        self._running: dict[Hashable, BackgroundExport] = {}

    def start(self, key: Hashable, export: BackgroundExport) -> None:
        self._running[key] = export

    def take(self, key: Hashable) -> BackgroundExport | None:
        return self._running.pop(key, None)

    def running(self, key: Hashable) -> bool:
        """Whether `key`'s worker is still exporting (False: finished, or not a background export)."""
        export = self._running.get(key)
        return export is not None and not export.finished()

    def wait_for_any(self, keys: list[Hashable]) -> Hashable:
        """The first of `keys` whose worker has finished, waiting until one has."""
        while True:
            for key in keys:
                if not self.running(key):
                    return key
            time.sleep(POLL_SECONDS)

    def cores_left(self) -> int | None:
        """The cores no running worker is exporting on (at least one), or None while none runs:
        what the export's own work (calibration, parity) should use beside the workers. Each
        worker keeps one core busy; torch's threads wait for each other at every operation,
        so two of them beside a worker on two cores spend their time waiting: the int8
        calibration of the default model took 120 s on two threads beside a busy core and
        57 s on one (33 s on two, alone)."""
        busy = sum(1 for export in self._running.values() if not export.finished())
        return max(1, (os.cpu_count() or 1) - busy) if busy else None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        for export in self._running.values():
            export.pause()
        try:
            yield
        finally:
            for export in self._running.values():
                export.resume()

    def close(self) -> None:
        for export in self._running.values():
            export.close()
        self._running.clear()


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` while active (None: left as they are)."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal group: the parent stops us
    die_with_parent()
    _work(Path(sys.argv[1]))
