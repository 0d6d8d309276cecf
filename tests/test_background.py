"""ExecuTorch's lowering in a worker process beside the rest of the export (edgelm.background)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import fast_export_options

from edgelm.background import BackgroundExport, BackgroundExports
from edgelm.errors import ExportError

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_export_lowers_executorch_in_the_background_and_leaves_no_scratch(tiny_llama, tmp_path, monkeypatch):
    import edgelm.background
    from edgelm.export import export_bundle

    monkeypatch.setattr(edgelm.background, "MIN_PARAMETERS", 0)  # the tiny model is below the default size
    manifest = export_bundle(
        tiny_llama, tmp_path / "bundle", fast_export_options(formats=("executorch", "gguf"), quants=("int8",))
    )
    names = [a.name for a in manifest.artifacts]
    assert names == ["reference-fp32", "executorch-int8", "gguf-int8"]  # the plan's order of preference
    order = [s["step"] for s in manifest.export_steps]
    assert order.index("Exporting gguf-int8") < order.index(
        "Waiting for executorch-int8's export in its background process"
    )
    executorch = manifest.artifact("executorch")
    assert executorch.parity["passed"] and executorch.parity["ppl_ratio"] < 1.01
    steps = {s["step"]: s for s in manifest.export_steps}
    background = steps["Exporting executorch-int8 (background process)"]
    assert background["background"] and background["seconds"] > 0
    # the worker's own peak memory (it holds a copy of the model and the lowering), and every step's
    assert background["peak_rss_mb"] > 100
    assert all(s["peak_rss_mb"] > 0 for s in manifest.export_steps)
    # in this process, how much of it was mapped files (Linux), never more than the peak
    here = [s for s in manifest.export_steps if not s["background"]]
    assert all(0 <= s["file_backed_mb"] <= s["peak_rss_mb"] for s in here)
    assert "Waiting for executorch-int8's export in its background process" in steps
    # where the worker's time went: its phases, one level down, listed before the step they ran in
    worker = order.index("Exporting executorch-int8 (background process)")
    phases = manifest.export_steps[worker - 4 : worker]
    assert [s["step"] for s in phases] == [
        "Quantizing the layers (int8)",
        "Capturing the graph (torch.export)",
        "Lowering to XNNPACK (to_edge_transform_and_lower)",
        "Writing the program (to_executorch)",
    ]
    assert all(s["depth"] == 1 and s["background"] and s["peak_rss_mb"] > 0 for s in phases)
    assert 0 < sum(s["seconds"] for s in phases) <= background["seconds"]
    # and an exporter's phases in this process nest under its step the same way
    gguf = order.index("Exporting gguf-int8")
    assert manifest.export_steps[gguf - 1]["step"] == "Writing the F32 GGUF (gguf.GGUFWriter)"
    assert manifest.export_steps[gguf - 1]["depth"] == 1 and not manifest.export_steps[gguf - 1]["background"]
    assert not list((tmp_path / "bundle").rglob(".background-*"))
    report = (tmp_path / "bundle" / "report" / "report.md").read_text()
    assert "| Exporting executorch-int8 (background process) |" in report and "beside the others" in report
    assert "| step | seconds | share | peak RSS (MB) | file-backed at end (MB) |" in report
    slowest = report.split("Slowest step per artifact: ")[1]
    assert "executorch-int8: " in slowest and "gguf-int8: " in slowest


def test_a_small_model_or_a_lone_artifact_is_exported_in_this_process(tmp_path, monkeypatch):
    import edgelm.background
    from edgelm.artifacts import ArtifactBuilder
    from edgelm.background import worth_a_second_process
    from edgelm.steps import StepClock

    small = torch.nn.Linear(64, 64)
    assert not worth_a_second_process(small)  # under MIN_PARAMETERS: the worker's start costs more
    monkeypatch.setattr(edgelm.background, "MIN_PARAMETERS", 0)
    assert worth_a_second_process(small)
    assert not worth_a_second_process(small, workers=10**9)  # no memory for that many copies
    builder = ArtifactBuilder(small, None, tmp_path, fast_export_options(), None, None, StepClock(), None)
    lone = [("safetensors", "fp32"), ("executorch", "int8")]
    assert builder.start_background_exports(lone) == lone  # nothing to overlap it with
    assert not builder.background._running


def _becomes(pid: int, stopped: bool, within_s: float = 5.0) -> bool:
    deadline = time.time() + within_s
    while (psutil.Process(pid).status() == psutil.STATUS_STOPPED) != stopped:
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def _start(tmp_path: Path) -> BackgroundExport:
    """A worker on a job it cannot finish quickly (a real model to load), for the process tests."""
    model = torch.nn.Linear(4, 4)
    return BackgroundExport(model, "executorch", None, tmp_path, "int8", "executorch-int8")


def test_a_worker_that_dies_becomes_an_export_error_and_its_files_go(tmp_path):
    export = _start(tmp_path)
    os.kill(export._process.pid, 9)
    with pytest.raises(ExportError, match=r"background export process was killed \(SIGKILL; .*out-of-memory"):
        export.result()
    assert list(tmp_path.iterdir()) == []


def test_a_python_error_in_the_worker_is_a_bug_not_bad_input(tmp_path):
    """An exception that escapes the worker (not an EdgeLMError from the exporter) is edgelm's
    bug: a RuntimeError, which the CLI reports as an internal error (exit 3)."""
    export = BackgroundExport(
        torch.nn.Linear(4, 4), ["not", "a", "format"], None, tmp_path, "int8", "broken"
    )  # TypeError there
    with pytest.raises(RuntimeError, match="broken: the background export process failed .*exit code 1"):
        export.result()
    assert list(tmp_path.iterdir()) == []


def test_a_worker_runs_at_its_exporters_niceness(tmp_path):
    """ExecuTorch's worker (the export's longest step) is less nice than TFLite's, so it gets the
    spare core first; each worker takes the niceness it was started with."""
    from edgelm.exporter import get_exporter

    assert get_exporter("executorch").background_nice < get_exporter("tflite").background_nice == 19
    export = BackgroundExport(torch.nn.Linear(4, 4), "executorch", None, tmp_path, "int8", "executorch-int8", nice=7)
    try:
        seen = set()
        deadline = time.time() + 60
        while 7 not in seen and export._process.poll() is None and time.time() < deadline:
            with contextlib.suppress(psutil.NoSuchProcess):
                seen.add(psutil.Process(export._process.pid).nice())
            time.sleep(0.01)
        assert 7 in seen, seen
    finally:
        export.close()


def test_paused_stops_the_worker_while_something_is_timed(tmp_path):
    exports = BackgroundExports()
    export = _start(tmp_path)
    exports.start("key", export)
    try:
        with exports.paused():
            assert _becomes(export._process.pid, stopped=True)  # signals arrive asynchronously
        assert _becomes(export._process.pid, stopped=False)
    finally:
        exports.close()
    assert not _alive(export._process.pid)
    assert list(tmp_path.iterdir()) == []


def test_the_worker_dies_with_a_killed_export(tiny_llama, tmp_path):
    """A SIGKILLed export cannot clean up: the kernel must stop its worker (PR_SET_PDEATHSIG)."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path[:0] = {[str(ROOT), str(ROOT / "tests")]!r}
        from edgelm.background import BackgroundExport
        from edgelm.model import inspect_source, load_reference_model
        source = inspect_source({str(tiny_llama)!r})
        model = load_reference_model(source, Path({str(tmp_path)!r}) / "tokenizer")
        export = BackgroundExport(model, "executorch", source, Path({str(tmp_path)!r}), "int8", "executorch-int8")
        print(export._process.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    time.sleep(5)  # the worker has set its death signal and is lowering (tens of seconds)
    assert _alive(worker)
    parent.kill()
    parent.wait()
    deadline = time.time() + 3
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(worker)


def test_a_worker_starts_only_when_memory_holds_it_and_what_the_export_itself_grows_by(monkeypatch):
    import types

    import psutil

    import edgelm.background as background

    model = torch.nn.Linear(256, 256, bias=False)
    weights = 256 * 256 * 4
    monkeypatch.setattr(background, "MIN_PARAMETERS", 0)

    def available(bytes_free):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=bytes_free))

    one_worker = (background.MEMORY_FACTOR + background.EXPORT_GROWTH) * weights + background.MEMORY_HEADROOM
    available(one_worker + 1)
    assert background.worth_a_second_process(model)
    assert not background.worth_a_second_process(model, workers=2)
    available(background.MEMORY_FACTOR * weights + background.MEMORY_HEADROOM + 1)  # the worker alone would fit
    assert not background.worth_a_second_process(model)


def test_a_worker_killed_for_memory_says_so():
    from edgelm.background import _killed_by

    assert "out-of-memory" in _killed_by(9) and "SIGKILL" in _killed_by(9)
    assert _killed_by(15) == "ended by SIGTERM"


class _Worker:
    """A stand-in for a BackgroundExport: finished after `polls` looks."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def finished(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


def test_the_worker_that_finishes_first_is_built_first(monkeypatch):
    """Artifacts left to build come in order, except that one whose worker is still exporting
    waits behind one whose worker has finished; with every worker still busy, the export waits
    for whichever finishes first (its own step), not for the first in the plan."""
    import contextlib

    from conftest import fast_export_options

    import edgelm.background
    from edgelm.artifacts import ArtifactBuilder

    monkeypatch.setattr(edgelm.background, "POLL_SECONDS", 0.0)
    steps: list[str] = []

    @contextlib.contextmanager
    def step(name: str):
        steps.append(name)
        yield

    builder = ArtifactBuilder(None, None, None, fast_export_options(), None, None, step, None)
    plan = [("gguf", "int4"), ("executorch", "int4"), ("tflite", "int8")]
    keys = {item: builder._background_key(item) for item in plan}
    builder.background.start(keys[("executorch", "int4")], _Worker(polls=10))
    builder.background.start(keys[("tflite", "int8")], _Worker(polls=3))
    assert builder.next_to_build(plan) == ("gguf", "int4") and not steps  # not a background artifact
    assert builder.next_to_build(plan[1:]) == ("tflite", "int8")  # after waiting for it, not for executorch
    assert steps == ["Waiting for the first of executorch-int4, tflite-int8 to finish in its background process"]
    assert builder.next_to_build([("executorch", "int4")]) == ("executorch", "int4")  # its own step waits


def test_cores_left_beside_running_workers(monkeypatch):
    """The export's own work gets the cores its workers leave (at least one); with no worker
    running it is left to the runtime's default (None)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    exports = BackgroundExports()
    assert exports.cores_left() is None
    exports.start("a", _Worker(polls=100))
    assert exports.cores_left() == 1
    exports.start("b", _Worker(polls=100))
    assert exports.cores_left() == 1  # never none: the export goes on
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert exports.cores_left() == 6
    exports.start("a", _Worker(polls=0))  # finished
    assert exports.cores_left() == 7


def test_torch_threads_are_set_while_active_and_restored():
    from edgelm.background import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_parity_beside_a_worker_uses_the_core_it_leaves_and_the_profile_every_core(tmp_path, monkeypatch):
    """Parity runs while workers export, on the cores they leave (two threads beside a busy
    worker on two cores wait for each other); the profile is timed with the workers paused,
    on a session reopened with every core, as every other artifact's."""
    import edgelm.artifacts
    from edgelm.artifacts import ArtifactBuilder, Attempt
    from edgelm.exporter import ExportedArtifact

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    opened: list[int | None] = []
    seen: dict[str, object] = {}

    class Session:
        def close(self) -> None:
            opened.append("closed")

    class Runtime:
        name = "fake"

        def open(self, path, threads=None):
            opened.append(threads)
            return Session()

        def version(self) -> str:
            return "1"

    class Evaluation:
        def parity(self, session, reference, quant):
            seen["parity_torch_threads"] = torch.get_num_threads()
            return {"passed": True}, None

        def profile(self, session, load_s, file_bytes):
            seen["profile_after"] = list(opened)
            return {"decode_tok_s": 1.0}

    class Exporter:
        format, runtime = "gguf", "fake"

    path = tmp_path / "model.gguf"
    path.write_bytes(b"x")
    monkeypatch.setattr(edgelm.artifacts, "get_runtime", lambda name: Runtime())
    builder = ArtifactBuilder(
        None, None, tmp_path, fast_export_options(), Evaluation(), None, lambda _: contextlib.nullcontext(), None
    )
    monkeypatch.setattr(builder, "_exported", lambda *a: (ExportedArtifact(path, "int8"), "none", {}))
    builder.background.start("worker", _Worker(polls=100))
    before = torch.get_num_threads()
    entry, failure, _ = builder._attempt(Exporter(), "gguf-int8", "gguf-int8", Attempt("int8", False), "int8")
    assert failure is None and entry.profile == {"decode_tok_s": 1.0}
    assert seen["parity_torch_threads"] == 1 and torch.get_num_threads() == before
    assert seen["profile_after"] == [1, "closed", 2]  # parity's session on one core, the profile's on both

    opened.clear()  # no worker running: one session, at the runtime's default
    builder.background = BackgroundExports()
    builder._attempt(Exporter(), "gguf-int8", "gguf-int8", Attempt("int8", False), "int8")
    assert opened == [None, "closed"]
