"""ExecuTorch runtime (executorch.runtime): runs edgelm's static-cache decoder programs.

The KV cache lives in the program's mutable buffers; a step passes token ids and the
position they start at. Method names and the max context are read from the program
(its `get_max_context` constant method), not hard-coded. A file is checked for the .pte
identifier and loaded with internal-consistency verification, so a truncated or foreign
file is an InvalidModelError, never a crash.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import DeviceError, InvalidModelError
from edgelm.native_log import quiet_native_stderr
from edgelm.session import Capabilities, model_failures

LOG_VARIABLE = "EDGELM_EXECUTORCH_LOG"  # set to 1 to see ExecuTorch's own log lines
PTE_IDENTIFIER = b"ET"  # flatbuffer file identifier at bytes 4..8 ("ET12", ...)


def _runtime():
    from edgelm.model import quiet_noisy_imports

    quiet_noisy_imports()  # executorch.runtime imports torchao, which logs optional kernels it could not load
    with quiet_native_stderr(LOG_VARIABLE):
        from executorch.runtime import Runtime, Verification

        _load_kernel_libraries()
        return Runtime.get(), Verification


# Kernel libraries the wheel ships beside the Python runtime, which does not load them
# itself: ExecuTorch's quantized kernels (embedding_byte, the int8/int4 programs' token
# lookup) and the llama custom ops (update_cache, custom_sdpa, edgelm's float32 decoders).
# Loading one runs its static registrations into the runtime's kernel table.
KERNEL_LIBRARIES = ("lib/libexecutorch_kernels_quantized.so", "extension/llm/custom_ops/libcustom_ops_aot_lib.so")


@functools.cache
def _load_kernel_libraries() -> None:
    import ctypes

    import executorch

    for relative in KERNEL_LIBRARIES:
        library = Path(executorch.__path__[0]) / relative
        if library.exists():  # absent in a runtime built without them: such programs then fail to load, clearly
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


def registered_backends() -> set[str]:
    """Delegate backends compiled into this ExecuTorch runtime (XnnpackBackend, ...)."""
    _runtime()
    from executorch.extension.pybindings import portable_lib

    return set(portable_lib._get_registered_backend_names())


def load_program(path: Path) -> object:
    """Load a .pte with internal-consistency verification; InvalidModelError if it is not a
    (whole) ExecuTorch program."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[4:6] != PTE_IDENTIFIER:
        raise InvalidModelError(f"{path}: not an ExecuTorch program (.pte); re-export it with edgelm")
    runtime, verification = _runtime()
    try:
        with quiet_native_stderr(LOG_VARIABLE):
            return runtime.load_program(path, verification=verification.InternalConsistency)
    except RuntimeError as err:
        raise InvalidModelError(f"{path}: ExecuTorch could not load it ({err}); the file may be truncated — "
                                "re-export it") from err


# Files this process wrote or already probed: (resolved path, size, mtime_ns). Loading them
# again skips the child-process probe below.
_KNOWN_GOOD: set[tuple[str, int, int]] = set()
PROBE_TIMEOUT_S = 300
PROBE_ADDRESS_SPACE = 16 << 30


def _identity(path: Path) -> tuple[str, int, int]:
    info = path.stat()
    return str(path.resolve()), info.st_size, info.st_mtime_ns


def mark_trusted(path: Path) -> None:
    """Record a .pte this process wrote itself (the exporter), so opening it needs no probe."""
    _KNOWN_GOOD.add(_identity(Path(path)))


def probe_in_child(path: Path) -> None:
    """Load the program and its methods in a child process first; InvalidModelError if it dies.

    ExecuTorch's native loader aborts the whole process on some damaged files (a delegate
    error whose message is not UTF-8 ends in std::terminate), which no try/except can
    catch. A long-lived child process under an address-space limit takes that risk
    instead (started once per process, restarted after a file kills it); only a file it
    loaded cleanly is opened here.
    """
    if _identity(path) in _KNOWN_GOOD:
        return
    problem = _PROBER.check(path)
    if problem:
        raise InvalidModelError(f"{path}: ExecuTorch could not load it ({problem}); the file is damaged or not an "
                                "edgelm program — re-export it")
    _KNOWN_GOOD.add(_identity(path))


# The child: one path per line in, one JSON answer per line out (on its own descriptor:
# native code prints to fd 1).
_PROBE_SOURCE = r"""
import json, os, resource, sys
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
limit = int(sys.argv[1]) if hard == resource.RLIM_INFINITY else min(int(sys.argv[1]), hard)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
answers = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
from pathlib import Path
from edgelm.runtimes.executorch import load_methods
for line in sys.stdin:
    answers.write(json.dumps({"problem": load_methods(Path(line.rstrip("\n")))}) + "\n")
    answers.flush()
"""


class _Prober:
    """The long-lived probe child of probe_in_child (one per process, behind a lock)."""

    def __init__(self) -> None:
        import threading

        self._proc: Any = None
        self._lock = threading.Lock()

    def check(self, path: Path) -> str | None:
        """None when the child loaded `path` cleanly, else what went wrong."""
        import atexit
        import json
        import selectors
        import subprocess
        import sys

        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen([sys.executable, "-c", _PROBE_SOURCE, str(PROBE_ADDRESS_SPACE)],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, text=True)
                atexit.register(self._proc.kill)
            proc = self._proc
            try:
                proc.stdin.write(f"{path.resolve()}\n")
                proc.stdin.flush()
            except BrokenPipeError:
                return self._died()
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                ready = selector.select(PROBE_TIMEOUT_S)
            line = proc.stdout.readline() if ready else ""
            if not ready:
                proc.kill()
                self._proc = None
                return f"no answer in {PROBE_TIMEOUT_S} s"
            if not line:
                return self._died()
            return json.loads(line)["problem"]

    def _died(self) -> str:
        code = self._proc.wait()
        self._proc = None
        return f"the loader crashed (signal {-code})" if code < 0 else f"the loader exited with {code}"


_PROBER = _Prober()


def load_methods(path: Path) -> str | None:
    """Load the program and every method edgelm uses and run each once (a short prefill and a
    decode step, or one encoder batch); None if that worked, else why not (what the probe
    child runs: the runtime aborts the process on some damaged programs when they execute)."""
    import torch

    try:
        program = load_program(path)
        with quiet_native_stderr(LOG_VARIABLE):
            methods = {name: program.load_method(name) for name in ("get_max_context", "is_encoder", "forward")
                       if name in program.method_names}
            for name in ("get_max_context", "is_encoder"):
                if name in methods:
                    methods[name].execute([])
            if "is_encoder" in methods and bool(methods["is_encoder"].execute([])[0]):
                ids = torch.ones((1, 4), dtype=torch.long)
                methods["forward"].execute([ids, torch.ones_like(ids)])
            elif "forward" in methods:  # a two-token prefill, then one decode step
                methods["forward"].execute([torch.ones((1, 2), dtype=torch.long), torch.tensor([0])])
                methods["forward"].execute([torch.ones((1, 1), dtype=torch.long), torch.tensor([2])])
    except (InvalidModelError, RuntimeError, IndexError, TypeError, ValueError) as err:
        return " ".join(str(err).split())[:300]
    except MemoryError:
        return "it needs more memory than the probe's address-space limit"
    return None


class ExecuTorchSession:
    def __init__(self, program: object, method: object, max_context: int):
        import torch

        self._torch = torch
        self._program, self._method = program, method
        self._pos = 0
        self.capabilities = Capabilities(max_context=max_context,
                                         notes={"kv_cache": f"static, {max_context} positions inside the program"})

    def _run(self, ids: np.ndarray) -> np.ndarray:
        if self._pos + len(ids) > self.capabilities.max_context:
            raise InvalidModelError(f"the program's static cache holds {self.capabilities.max_context} positions; "
                                    f"{self._pos + len(ids)} requested")
        torch = self._torch
        inputs = [torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1)),
                  torch.tensor([self._pos], dtype=torch.long)]
        with model_failures("ExecuTorch"):
            logits = self._method.execute(inputs)[0]
        self._pos += len(ids)
        return logits[0].float().numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._run(np.asarray(ids, dtype=np.int64))

    def decode(self, token_id: int) -> np.ndarray:
        return self._run(np.asarray([token_id], dtype=np.int64))[-1]

    def reset(self) -> None:
        # positions are absolute and the mask hides every slot past the last written one,
        # so starting again at 0 overwrites the old sequence as it goes
        self._pos = 0

    def close(self) -> None:
        self._method = self._program = None


class ExecuTorchEncoderSession:
    """An encoder program (edgelm.encoder_graph): a padded batch in, one vector per row out."""

    def __init__(self, program: object, method: object, max_context: int):
        import torch

        self._torch = torch
        self._program, self._method = program, method
        self.capabilities = Capabilities(max_context=max_context, notes={"delegate": "xnnpack"})

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        inputs = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (input_ids, attention_mask)]
        with model_failures("ExecuTorch"):
            return self._method.execute(inputs)[0].float().numpy()

    def close(self) -> None:
        self._method = self._program = None


class ExecuTorchAdapter:
    name = "executorch"

    def version(self) -> str:
        from importlib import metadata

        return f"executorch {metadata.version('executorch')}"

    def available_devices(self) -> tuple[str, ...]:
        return ("cpu",)  # XNNPACK; the Python runtime ships no GPU/NPU delegate

    def open(self, path: Path, device: str = "cpu", threads: int | None = None
             ) -> ExecuTorchSession | ExecuTorchEncoderSession:
        if device not in self.available_devices():
            raise DeviceError(f"ExecuTorch's Python runtime here runs XNNPACK on cpu only, not {device!r}; "
                              "GPU/NPU delegates (Vulkan, QNN, Core ML) run in the app's native runtime")
        path = Path(path)
        probe_in_child(path)
        program = load_program(path)
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)
        try:
            with quiet_native_stderr(LOG_VARIABLE):
                missing = {"forward", "get_max_context"} - set(program.method_names)
                if missing:
                    raise InvalidModelError(f"{path}: the program lacks {', '.join(sorted(missing))}; it was not "
                                            "exported by edgelm's ExecuTorch exporter")
                max_context = int(program.load_method("get_max_context").execute([])[0])
                encoder = "is_encoder" in program.method_names and bool(program.load_method("is_encoder").execute([])[0])
                method = program.load_method("forward")
        except RuntimeError as err:
            if "0x:14" in str(err) or "0x14" in str(err):  # Error::OperatorMissing
                raise InvalidModelError(f"{path}: the program uses an operator this ExecuTorch runtime has no kernel "
                                        f"for ({err}); run it with the executorch version edgelm doctor lists") from err
            raise InvalidModelError(f"{path}: ExecuTorch could not load it ({err}); the file may be truncated — "
                                    "re-export it") from err
        return (ExecuTorchEncoderSession if encoder else ExecuTorchSession)(program, method, max_context)


ADAPTER = ExecuTorchAdapter()
