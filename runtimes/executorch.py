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

import numpy as np

from edgelm.errors import DeviceError, InvalidModelError
from edgelm.isolation import open_isolated, runs_here
from edgelm.native_log import quiet_native_stderr
from edgelm.session import Capabilities, model_failures, token_ids

LOG_VARIABLE = "EDGELM_EXECUTORCH_LOG"  # set to 1 to see ExecuTorch's own log lines
PTE_IDENTIFIER = b"ET"  # flatbuffer file identifier at bytes 4..8 ("ET12", ...)


def _runtime():
    from edgelm.model import quiet_noisy_imports

    quiet_noisy_imports()  # executorch.runtime imports torchao, which logs optional kernels it could not load
    with quiet_native_stderr(LOG_VARIABLE):
        from executorch.runtime import Runtime, Verification

        load_kernel_libraries()
        return Runtime.get(), Verification


# Kernel libraries the wheel ships beside the Python runtime, which does not load them
# itself: ExecuTorch's quantized kernels (embedding_byte, the int8/int4 programs' token
# lookup) and the llama custom ops (update_cache, custom_sdpa, edgelm's float32 decoders).
# Loading one runs its static registrations into the runtime's kernel table.
KERNEL_LIBRARIES = ("lib/libexecutorch_kernels_quantized.so", "extension/llm/custom_ops/libcustom_ops_aot_lib.so")


@functools.cache
def load_kernel_libraries() -> None:
    """Register ExecuTorch's quantized and llama custom-op kernels in this process (what an app
    links in); needed before ExecuTorch's runtime or its LLM runner runs an edgelm .pte."""
    import ctypes

    import executorch
    import torch  # noqa: F401  the custom-op library links against libtorch, loaded by this import

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
        raise InvalidModelError(
            f"{path}: ExecuTorch could not load it ({err}); the file may be truncated — re-export it"
        ) from err


class ExecuTorchSession:
    def __init__(self, program: object, method: object, max_context: int, vocab_size: int | None = None):
        import torch

        self._torch = torch
        self._program, self._method = program, method
        self._pos = 0
        self.capabilities = Capabilities(
            max_context=max_context,
            vocab_size=vocab_size,
            notes={"kv_cache": f"static, {max_context} positions inside the program"},
        )

    def _run(self, ids: np.ndarray) -> np.ndarray:
        if self._pos + len(ids) > self.capabilities.max_context:
            raise InvalidModelError(
                f"the program's static cache holds {self.capabilities.max_context} positions; "
                f"{self._pos + len(ids)} requested"
            )
        torch = self._torch
        inputs = [
            torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1)),
            torch.tensor([self._pos], dtype=torch.long),
        ]
        with model_failures("ExecuTorch"):
            logits = self._method.execute(inputs)[0]
        self._pos += len(ids)
        return logits[0].float().numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._run(token_ids(ids, self.capabilities))

    def decode(self, token_id: int) -> np.ndarray:
        return self._run(token_ids([token_id], self.capabilities))[-1]

    def reset(self) -> None:
        # positions are absolute and the mask hides every slot past the last written one,
        # so starting again at 0 overwrites the old sequence as it goes
        self._pos = 0

    def truncate(self, length: int) -> None:
        self._pos = min(self._pos, max(0, length))  # as reset: later slots are masked, then overwritten

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

    def preload(self) -> None:
        """Load the native runtime and its kernels without opening a file (edgelm.isolation's fork server)."""
        _runtime()

    def available_devices(self) -> tuple[str, ...]:
        return ("cpu",)  # XNNPACK; the Python runtime ships no GPU/NPU delegate

    def open(
        self, path: Path, device: str = "cpu", threads: int | None = None
    ) -> ExecuTorchSession | ExecuTorchEncoderSession:
        if device not in self.available_devices():
            raise DeviceError(
                f"ExecuTorch's Python runtime here runs XNNPACK on cpu only, not {device!r}; "
                "GPU/NPU delegates (Vulkan, QNN, Core ML) run in the app's native runtime"
            )
        path = Path(path)
        if not runs_here(path):  # its native code can end the process on a damaged file
            return open_isolated(self.name, path, device, threads)
        program = load_program(path)
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)
        try:
            with quiet_native_stderr(LOG_VARIABLE):
                missing = {"forward", "get_max_context"} - set(program.method_names)
                if missing:
                    raise InvalidModelError(
                        f"{path}: the program lacks {', '.join(sorted(missing))}; it was not "
                        "exported by edgelm's ExecuTorch exporter"
                    )
                max_context = int(program.load_method("get_max_context").execute([])[0])
                encoder = "is_encoder" in program.method_names and bool(
                    program.load_method("is_encoder").execute([])[0]
                )
                vocab = (
                    int(program.load_method("get_vocab_size").execute([])[0])
                    if "get_vocab_size" in program.method_names
                    else None
                )
                method = program.load_method("forward")
        except (IndexError, TypeError, ValueError) as err:  # a constant method that returns nothing usable
            raise InvalidModelError(
                f"{path}: the program's constant methods are not edgelm's ({err}); re-export it"
            ) from err
        except RuntimeError as err:
            if "0x:14" in str(err) or "0x14" in str(err):  # Error::OperatorMissing
                raise InvalidModelError(
                    f"{path}: the program uses an operator this ExecuTorch runtime has no kernel "
                    f"for ({err}); run it with the executorch version edgelm doctor lists"
                ) from err
            raise InvalidModelError(
                f"{path}: ExecuTorch could not load it ({err}); the file may be truncated — re-export it"
            ) from err
        if encoder:
            return ExecuTorchEncoderSession(program, method, max_context)
        return ExecuTorchSession(program, method, max_context, vocab)


ADAPTER = ExecuTorchAdapter()
