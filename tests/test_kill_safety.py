"""SIGKILL at random points of `edgelm export` (with and without --overwrite) and of `edgelm push`:
the path holds the complete old bundle or the complete new one every time (or nothing, when
there was nothing before), and no staging folder is left after the next run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fast_export_options

from edgelm.bundle import read_bundle
from edgelm.export import export_bundle
from edgelm.staging import clean_stale

KILLS = int(os.environ.get("EDGELM_KILLS", "12"))
EDGELM = [sys.executable, "-m", "edgelm"]


def _kill_at(argv: list[str], delay: float) -> float | None:
    """Start argv, SIGKILL it after `delay` s; None when it was still running then (killed),
    else how long it took: the machine may have sped up since the first run was timed (the
    other test worker finished), and the caller shortens its delays to match."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return time.monotonic() - started
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _timed(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    return time.monotonic() - started


def _state(path: Path, old_created: str | None, allow_absent: bool) -> str:
    if not path.exists():
        assert allow_absent, f"{path} is gone: a kill left no bundle where one was"
        return "absent"
    manifest = read_bundle(path)  # every file present and matching its sha256
    return "old" if manifest.created == old_created else "new"


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or p.name.startswith(f"{name}.")]


@pytest.mark.slow
def test_sigkill_during_export_leaves_old_or_new_bundle(tiny_llama, tmp_path):
    out = tmp_path / "bundle"
    argv = [*EDGELM, "export", str(tiny_llama), "--formats", "safetensors", "--no-profile", "-o", str(out)]
    full = _timed([*argv])  # also leaves a complete bundle to replace
    rng = random.Random(16)
    seen = {"absent": 0, "old": 0, "new": 0, "finished": 0}
    for i in range(3 * KILLS):  # until KILLS kills have landed (a run may finish before its kill)
        if seen["absent"] + seen["old"] + seen["new"] == KILLS:
            break
        overwrite = i % 2 == 0
        if not overwrite and out.exists():
            shutil.rmtree(out)
        if overwrite and not out.exists():
            export_bundle(tiny_llama, out, fast_export_options(formats=("safetensors",), profile=False))
        old_created = read_bundle(out).created if out.exists() else None
        # half the kills anywhere, half near the end, where the swap happens
        delay = full * (rng.uniform(0.03, 1.0) if i % 4 < 2 else rng.uniform(0.8, 1.02))
        finished_in = _kill_at([*argv, *(["--overwrite"] if overwrite else [])], delay)
        state = _state(out, old_created, allow_absent=not overwrite)
        seen["finished" if finished_in is not None else state] += 1
        full = min(full, finished_in or full)
        time.sleep(0.05)
        clean_stale(out)  # what the next run does first
        assert _leftovers(tmp_path, "bundle") == [], f"kill {i}: left {_leftovers(tmp_path, 'bundle')}"
    assert seen["absent"] + seen["old"] + seen["new"] == KILLS
    print(f"export kills: {seen} (full export {full:.1f} s)")


@pytest.mark.slow
def test_sigkill_during_push_leaves_old_or_new_bundle(tiny_llama, tmp_path):
    bundle = tmp_path / "bundle"
    export_bundle(tiny_llama, bundle, fast_export_options(formats=("safetensors",), profile=False))
    device = tmp_path / "device"
    device.mkdir()
    dest = device / "b"
    argv = [*EDGELM, "push", str(bundle), "--device", "local", "--to", str(dest), "--formats", "reference-fp32"]
    full = _timed(argv)
    rng = random.Random(17)
    seen = {"absent": 0, "old": 0, "new": 0, "finished": 0}
    for i in range(3 * KILLS):
        if seen["absent"] + seen["old"] + seen["new"] == KILLS:
            break
        if i % 2 and dest.exists():
            shutil.rmtree(dest)  # every other kill: a first push, with nothing there before
        old_created = None
        if dest.exists():  # mark the earlier copy so a replaced one is told apart
            old_created = read_bundle(dest).created
        finished_in = _kill_at(argv, rng.uniform(0.05, full))
        time.sleep(0.3)  # a device-side `sh` started before the kill finishes its rename
        state = _state(dest, old_created, allow_absent=old_created is None)
        seen["finished" if finished_in is not None else state] += 1
        full = min(full, finished_in or full)
        subprocess.run(argv, check=True, capture_output=True, timeout=300)  # the next run cleans up
        assert _leftovers(device, "b") == [], f"kill {i}: left {_leftovers(device, 'b')}"
        assert read_bundle(dest)
    assert seen["absent"] + seen["old"] + seen["new"] == KILLS
    print(f"push kills: {seen} (full push {full:.1f} s)")
