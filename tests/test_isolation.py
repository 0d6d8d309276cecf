"""Runtimes whose native code can end the process run files this process did not write in a
child process (edgelm.isolation): same answers, and a crash or hang there is an error here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edgelm.bundle import read_bundle
from edgelm.errors import EdgeLMError, InvalidModelError
from edgelm.isolation import (
    CHILD_VARIABLE,
    ISOLATED_RUNTIMES,
    IsolatedSession,
    runs_here,
)
from edgelm.session import get_runtime


def _untrusted_copies(bundle, tmp_path) -> dict[str, object]:
    """One decoder artifact per isolated runtime, copied (a file this process did not write)."""
    copies = {}
    for entry in read_bundle(bundle).artifacts:
        if entry.runtime in ISOLATED_RUNTIMES and entry.runtime not in copies:
            copy = tmp_path / entry.runtime / entry.path
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / entry.path, copy)
            copies[entry.runtime] = (bundle / entry.path, copy)
    return copies


def test_files_not_written_here_run_in_a_child_with_the_same_logits(tiny_bundle, tmp_path, monkeypatch):
    copies = _untrusted_copies(tiny_bundle, tmp_path)
    assert set(copies) == set(ISOLATED_RUNTIMES), copies
    ids = np.array([5, 17, 42, 7], dtype=np.int64)
    for runtime, (written, copy) in copies.items():
        assert not runs_here(copy)
        adapter = get_runtime(runtime)
        with monkeypatch.context() as inside:  # what the child itself does: open in this process
            inside.setenv(CHILD_VARIABLE, "1")
            here = adapter.open(written, threads=1)
        there = adapter.open(copy, threads=1)
        try:
            assert not isinstance(here, IsolatedSession) and isinstance(there, IsolatedSession), runtime
            assert there.capabilities.max_context == here.capabilities.max_context
            np.testing.assert_array_equal(there.prefill(ids), here.prefill(ids))
            np.testing.assert_array_equal(there.decode(9), here.decode(9))
            there.reset()
            here.reset()
            np.testing.assert_array_equal(there.prefill(ids[:2]), here.prefill(ids[:2]))
            there.truncate(1)  # the prefix cache's cut, carried to the child
            here.truncate(1)
            np.testing.assert_array_equal(there.prefill(ids[1:3]), here.prefill(ids[1:3]))
            with pytest.raises(EdgeLMError) as in_process:
                here.decode(1 << 40)
            with pytest.raises(in_process.type, match=str(in_process.value)[:40]):  # raised there, same class here
                there.decode(1 << 40)
        finally:
            here.close()
            there.close()


def test_a_child_that_crashes_mid_session_is_an_invalid_model_error_and_the_caller_lives_on(tiny_bundle, tmp_path):
    _, copy = _untrusted_copies(tiny_bundle, tmp_path)["executorch"]
    session = get_runtime("executorch").open(copy, threads=1)
    session.prefill(np.array([1, 2, 3]))
    os.kill(session._pid, signal.SIGSEGV)  # what a damaged program's out-of-bounds read does to its process
    with pytest.raises(InvalidModelError, match="in its own process .*its process ended"):
        session.decode(4)
    with pytest.raises(InvalidModelError, match="closed"):
        session.decode(4)
    again = get_runtime("executorch").open(copy, threads=1)  # the next open gets a fresh child
    assert again.decode(4).shape == (again.capabilities.vocab_size,)
    again.close()


def test_a_hung_child_is_killed_after_the_call_timeout(tiny_bundle, tmp_path, monkeypatch):
    from edgelm import isolation

    _, copy = _untrusted_copies(tiny_bundle, tmp_path)["llama.cpp"]
    session = get_runtime("llama.cpp").open(copy, threads=1)
    monkeypatch.setattr(isolation, "CALL_TIMEOUT_S", 1)
    os.kill(session._pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(InvalidModelError, match="no answer in 1 s"):
        session.prefill(np.array([1, 2, 3]))
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # killed, and reaped by the fork server
        try:
            os.kill(session._pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the hung child is still there")


ABORTING_CALLER = r"""
import sys
from pathlib import Path
import numpy as np
from edgelm.session import get_runtime
session = get_runtime("executorch").open(Path(sys.argv[1]), threads=1)
session.prefill(np.array([1, 2, 3]))
print("ran", type(session).__name__)
print("libexecutorch loaded here:", any("libexecutorch.so" in line for line in open("/proc/self/maps")))
"""


def test_executorch_never_loads_into_a_process_that_did_not_write_the_program(tiny_bundle, tmp_path):
    """The guarantee behind the fuzz figures: ExecuTorch's native library never reads an untrusted
    program in the caller, so none of its crashes can end the caller (checked on /proc/self/maps)."""
    _, copy = _untrusted_copies(tiny_bundle, tmp_path)["executorch"]
    result = subprocess.run(
        [sys.executable, "-c", ABORTING_CALLER, str(copy)], capture_output=True, text=True, timeout=300, check=True
    )
    assert "ran IsolatedSession" in result.stdout and "loaded here: False" in result.stdout, result.stdout
    inside = subprocess.run(
        [sys.executable, "-c", ABORTING_CALLER, str(copy)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "EDGELM_ISOLATED_CHILD": "1"},
    )
    assert "loaded here: True" in inside.stdout, inside.stdout  # what the check above would see without isolation
