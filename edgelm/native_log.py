"""Silence what libraries print: converters' Python output (`quiet_library_output`) and what
native runtimes write straight to file descriptors 1 and 2.

Converters (torch.export, torch.onnx, litert-torch, ai-edge-quantizer) print progress and warn
about internals a user cannot act on; the lines would tear the progress display, and an error
still propagates. ExecuTorch and LiteRT log from C++ (cpuinfo probes, accelerator registration, plugin
loading) where Python's logging cannot reach; edgelm reports failures itself, so those
lines only tear the progress display. Each runtime names an environment variable that
keeps them (EDGELM_EXECUTORCH_LOG=1, EDGELM_LITERT_LOG=1) for debugging.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_library_output(loggers: tuple[str, ...] = ("torch",), stderr: bool = False) -> Iterator[None]:
    """For the duration: Python's stdout (and stderr) captured, warnings ignored, the named
    loggers raised to ERROR; all restored afterwards, also on error."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()) if stderr else contextlib.nullcontext(),
    ):
        warnings.simplefilter("ignore")
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def quiet_native_stderr(keep_variable: str) -> Iterator[None]:
    """Send fd 2 to /dev/null for the duration, unless the environment sets `keep_variable`."""
    with quiet_native_streams(keep_variable, (2,)):
        yield


@contextlib.contextmanager
def quiet_native_streams(keep_variable: str, fds: tuple[int, ...] = (1, 2)) -> Iterator[None]:
    """Send the file descriptors `fds` to /dev/null for the duration, unless the environment
    sets `keep_variable` (the vendors' LLM runners also print tokens and stats to fd 1)."""
    if os.environ.get(keep_variable):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    with open(os.devnull, "w") as devnull:
        for fd in fds:
            os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


@contextlib.contextmanager
def captured_native_stdout() -> Iterator[list[bytes]]:
    """Collect what native code writes to fd 1 for the duration (the list gets the bytes on exit):
    ExecuTorch's LLM runner prints the generated text there, byte for byte, where its Python
    callback fails on a piece that is not valid UTF-8 on its own."""
    import ctypes
    import tempfile

    sys.stdout.flush()
    collected: list[bytes] = []
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield collected
        finally:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers a file; push what the runner printed
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            collected.append(sink.read())


def quiet_native_exit(keep_variable: str = "EDGELM_LITERT_LOG") -> None:
    """Silence what native libraries print from their static destructors after Python has finished
    (LiteRT's accelerator registry logs "DestroyAccelerator" lines to fd 2 at process exit), unless
    the environment sets `keep_variable`. Registered first, the handler runs last: every message
    of the program itself is already out."""
    import atexit

    def close_stderr() -> None:
        if os.environ.get(keep_variable):
            return
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    atexit.register(close_stderr)
