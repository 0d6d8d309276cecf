"""edgelm: export a language model to on-device formats, check parity, run and profile it.

`import edgelm` stays light (no torch, no transformers): heavy libraries are imported only
by the exporters and runtimes that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgelm.errors import (
    BundleError,
    DeviceError,
    EdgeLMError,
    InvalidModelError,
    ParityError,
    TokenizerError,
    UnsupportedError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgelm.api import LanguageModel, TextEncoder


def load(
    path: Any, format: str | None = None, device: str = "cpu", threads: int | None = None, verify: bool = True
) -> LanguageModel | TextEncoder:
    """Open an artifact of a bundle; see edgelm.api.load."""
    from edgelm.api import load as _load

    return _load(path, format=format, device=device, threads=threads, verify=verify)


__all__ = [
    "load",
    "EdgeLMError",
    "InvalidModelError",
    "UnsupportedError",
    "TokenizerError",
    "BundleError",
    "DeviceError",
    "ParityError",
    "__version__",
]
