"""Silence what native runtimes print straight to file descriptor 2.

ExecuTorch and LiteRT log from C++ (cpuinfo probes, accelerator registration, plugin
loading) where Python's logging cannot reach; edgelm reports failures itself, so those
lines only tear the progress display. Each runtime names an environment variable that
keeps them (EDGELM_EXECUTORCH_LOG=1, EDGELM_LITERT_LOG=1) for debugging.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_native_stderr(keep_variable: str) -> Iterator[None]:
    """Send fd 2 to /dev/null for the duration, unless the environment sets `keep_variable`."""
    if os.environ.get(keep_variable):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
