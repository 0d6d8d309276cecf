"""Open an untrusted artifact in a child process first, where a native crash costs nothing.

Some vendor runtimes end the whole process on a damaged file instead of raising: ExecuTorch
aborts (std::terminate on a delegate error whose message is not UTF-8, ET_CHECK on a wrong
value type while executing), llama.cpp aborts on GGML_ASSERTs in its loader, LiteRT
segfaults on some tensor tables that pass its own checks (all found by tests/test_fuzz.py).
No try/except can catch that, so before such a runtime opens a file in this process, a
long-lived child process (started on first use, under an address-space limit, restarted
after a file kills it) opens it with the same adapter and runs a short prefill and two
decode steps (or one encoder batch). Only a file that survived that is opened here.

A probe covers the inputs it runs, in its own process: a damaged ExecuTorch program that
reads out of bounds only in some memory layouts can still pass it (4 of 10,000 mutants of an
earlier exporter's program in benchmarks/results/fuzz_parsers.json; 0 of 10,000 of the current
one in benchmarks/results/fuzz_executorch_rerun.json). Token ids are checked against the
vocabulary by every session (edgelm.session.token_ids), not left to a kernel that aborts.

Files this process wrote itself (the exporter's artifacts, opened right after for parity,
identified by path, inode, size and mtime) are not probed. Every other open is probed, each
time: file timestamps are too coarse (a few ms) to tell a rewritten file from a probed one.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidModelError

CHILD_VARIABLE = "EDGELM_PROBE_CHILD"  # set in the child: it opens files directly
PROBE_TIMEOUT_S = 600
ADDRESS_SPACE = 32 << 30
_written_here: set[tuple[str, int, int, int]] = set()


def _identity(path: Path) -> tuple[str, int, int, int]:
    info = path.stat()
    return str(path.resolve()), info.st_ino, info.st_size, info.st_mtime_ns


def mark_trusted(path: Path) -> None:
    """Record a file this process wrote itself, so opening it needs no probe."""
    _written_here.add(_identity(Path(path)))


def probe(runtime: str, path: Path) -> None:
    """Open `path` with `runtime` in the probe child first; InvalidModelError if that fails or dies."""
    path = Path(path)
    if os.environ.get(CHILD_VARIABLE) or _identity(path) in _written_here:
        return
    problem = _PROBER.check(runtime, path)
    if problem:
        raise InvalidModelError(f"{path}: {runtime} could not open and run it ({problem}); the file is damaged or "
                                "not an edgelm artifact — re-export it")


def exercise(session: Any) -> None:
    """What the child runs on an opened session: a short prefill and two decode steps, or an encoder batch."""
    import numpy as np

    if hasattr(session, "prefill"):  # the ids generation would feed: its argmax, and the vocabulary's ends
        session.reset()
        logits = session.prefill(np.array([1, 2, 0], dtype=np.int64))
        vocab = logits.shape[-1]
        session.decode(int(np.argmax(logits[-1])) % vocab)
        session.decode(vocab - 1)
    else:
        ids = np.ones((1, 4), dtype=np.int64)
        session.run(ids, np.ones_like(ids))


# The child: one JSON case per line in, one JSON answer per line out, on a descriptor of its
# own (native code prints to fd 1).
_CHILD_SOURCE = r"""
import json, os, resource, sys
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
limit = int(sys.argv[1]) if hard == resource.RLIM_INFINITY else min(int(sys.argv[1]), hard)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
answers = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
from pathlib import Path
from edgelm.errors import EdgeLMError
from edgelm.probe import exercise
from edgelm.session import get_runtime
for line in sys.stdin:
    case = json.loads(line)
    problem = None
    try:
        session = get_runtime(case["runtime"]).open(Path(case["path"]), threads=1)
        try:
            exercise(session)
        finally:
            session.close()
    except EdgeLMError as err:
        problem = " ".join(str(err).split())[:300]
    except MemoryError:
        problem = "it needs more memory than the probe's address-space limit"
    except Exception as err:
        problem = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    answers.write(json.dumps({"problem": problem}) + "\n")
    answers.flush()
"""


class _Prober:
    """The probe child (one per process, used behind a lock)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_SOURCE, str(ADDRESS_SPACE)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, CHILD_VARIABLE: "1"})
        atexit.register(proc.kill)
        return proc

    def check(self, runtime: str, path: Path) -> str | None:
        """None when the child opened and ran `path` cleanly, else what went wrong."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                proc.stdin.write(json.dumps({"runtime": runtime, "path": str(path.resolve())}) + "\n")
                proc.stdin.flush()
            except BrokenPipeError:
                return self._died()
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                ready = selector.select(PROBE_TIMEOUT_S)
            if not ready:
                proc.kill()
                proc.wait()
                self._proc = None
                return f"no answer in {PROBE_TIMEOUT_S} s"
            line = proc.stdout.readline()
            return json.loads(line)["problem"] if line else self._died()

    def _died(self) -> str:
        code = self._proc.wait() if self._proc else 0
        self._proc = None
        return f"the runtime crashed (signal {-code})" if code < 0 else f"the runtime exited with {code}"


_PROBER = _Prober()
