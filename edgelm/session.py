"""The protocol every runtime adapter implements, and the registry that finds them.

A runtime turns one artifact file into a `Session`: a stateful KV-cached decoder with
`prefill(ids) -> logits[n, vocab]` and `decode(id) -> logits[vocab]` — or, for an
encoder, an `EncoderSession`: `run(ids, mask) -> [batch, size]`. Sampling, stop
criteria, chat templates and streaming live once in edgelm.generate, never per backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from edgelm.errors import InvalidModelError, UnsupportedError


@dataclass(frozen=True)
class Capabilities:
    max_context: int
    notes: dict[str, str] = field(default_factory=dict)
    vocab_size: int | None = None  # token ids a decoder takes: 0 .. vocab_size - 1 (None: the runtime checks)


def token_ids(ids: object, capabilities: Capabilities) -> np.ndarray:
    """`ids` as int64 [n], or a PromptError when one lies outside the model's vocabulary.

    Checked before any runtime sees them: ExecuTorch's quantized embedding kernel aborts the
    whole process on an out-of-range id, and the others fail with messages about their own
    internals (a tokenizer whose added tokens outgrow the model's table does this too).
    """
    from edgelm.errors import PromptError

    try:
        array = np.asarray(ids, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as err:
        raise PromptError(f"token ids must be integers ({type(err).__name__}: {str(err)[:80]})") from err
    vocab = capabilities.vocab_size
    if vocab and array.size and (int(array.min()) < 0 or int(array.max()) >= vocab):
        bad = int(array[(array < 0) | (array >= vocab)][0])
        raise PromptError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    return array


class Session(Protocol):
    capabilities: Capabilities

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Append `ids` (int64 [n]) to the cache; return float32 logits [n, vocab]."""

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token; return float32 logits [vocab]."""

    def reset(self) -> None:
        """Forget the cache (start a new sequence)."""

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached positions and forget the rest: the next prefill
        continues from there (edgelm.prefix_cache reuses a shared prompt prefix this way)."""

    def close(self) -> None:
        """Release the runtime's memory."""


class EncoderSession(Protocol):
    """A stateless encoder (BERT-style): a padded batch in, one vector per row out."""

    capabilities: Capabilities  # max_context is the longest input it takes

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 [batch, n] ids and mask -> float32 [batch, size] (embeddings or logits)."""

    def close(self) -> None:
        """Release the runtime's memory."""


class RuntimeAdapter(Protocol):
    name: str  # registry key, also written into the manifest

    def available_devices(self) -> tuple[str, ...]:
        """Devices this install can run on ("cpu", "gpu", "npu")."""

    def open(self, path: Path, device: str = "cpu", threads: int | None = None) -> Session | EncoderSession:
        """Open an artifact (a decoder gives a Session, an encoder an EncoderSession);
        DeviceError for a device it cannot use, InvalidModelError for a bad file."""

    def version(self) -> str:
        """The runtime library's version, for manifests and device records."""


# runtime name -> module that defines `ADAPTER`. Imported lazily: a runtime-only install
# never imports torch unless it opens a torch artifact. One line per runtime.
RUNTIME_MODULES: dict[str, str] = {
    "torch": "edgelm.runtimes.torch_reference",
    "onnxruntime": "edgelm.runtimes.onnxruntime",
    "llama.cpp": "edgelm.runtimes.llamacpp",
    "executorch": "edgelm.runtimes.executorch",
    "litert": "edgelm.runtimes.litert",
}


@contextmanager
def model_failures(runtime: str, errors: tuple[type[BaseException], ...] = (RuntimeError,)) -> Iterator[None]:
    """A runtime's own error while running a model it loaded becomes an InvalidModelError.

    edgelm builds the inputs itself, so a runtime that fails on them is failing on the
    file (damaged or not edgelm's): bad input, exit 2, one line.
    """
    try:
        yield
    except errors as err:
        detail = " ".join(str(err).split())[:300]
        raise InvalidModelError(
            f"{runtime} failed running this model ({type(err).__name__}: {detail}); the file may "
            "be damaged — re-export it"
        ) from err


def get_runtime(name: str) -> RuntimeAdapter:
    """Return the adapter registered as `name`; UnsupportedError if unknown or not installed."""
    if name not in RUNTIME_MODULES:
        raise UnsupportedError(f"unknown runtime {name!r}; known runtimes: {', '.join(sorted(RUNTIME_MODULES))}")
    try:
        module = importlib.import_module(RUNTIME_MODULES[name])
    except ImportError as err:
        raise UnsupportedError(
            f"runtime {name!r} is not installed ({err.name} missing); install the matching edgelm extra"
        ) from err
    return module.ADAPTER
