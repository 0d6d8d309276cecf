"""One error hierarchy for everything edgelm refuses or fails to do.

Every message says what happened, to which file, and what to do next. Library
exceptions are caught where edgelm calls the library and re-raised from one of these.
`exit_code` is what the CLI exits with: 2 for bad input, 1 for a failed parity gate.
"""

from __future__ import annotations


class EdgeLMError(Exception):
    """Base class; the CLI prints `str(err)` on one line and exits with `exit_code`."""

    exit_code = 2


class InvalidModelError(EdgeLMError):
    """The model file or folder is missing, truncated, garbage or unsafe to read."""


class UnsupportedError(EdgeLMError):
    """A valid request edgelm cannot do: unknown architecture, format, quant or device."""


class ExportError(EdgeLMError):
    """A format's converter failed on a model edgelm accepted (the converter's message is kept)."""


class TokenizerError(EdgeLMError):
    """The tokenizer or chat template is missing or cannot be used."""


class PromptError(EdgeLMError):
    """A prompt the model cannot take: empty, or longer than its context."""


class BundleError(EdgeLMError):
    """A bundle is incomplete, fails its schema, or a file does not match its sha256."""


class DeviceError(EdgeLMError):
    """A device or runtime delegate is unavailable or stopped answering."""


class ParityError(EdgeLMError):
    """An artifact drifted past its parity gate (use --allow-drift to keep it anyway)."""

    exit_code = 1


class VendorMismatchError(EdgeLMError):
    """A format's own LLM runtime refused an artifact or generated other text than edgelm
    (use --allow-vendor-mismatch to keep it anyway)."""

    exit_code = 1
