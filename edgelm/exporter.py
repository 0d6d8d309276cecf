"""The protocol every format exporter implements, and the registry that finds them.

An exporter writes one artifact for one quant recipe into the bundle folder and says
what it did; the pipeline (edgelm.export) then opens it through its runtime, measures
parity and profiles it. Adding a format is one module in exporters/ plus one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgelm.errors import UnsupportedError
from edgelm.model import SourceModel


@dataclass
class ExportedArtifact:
    path: Path  # the file a runtime opens (inside the bundle folder)
    quant: str
    signature: dict[str, Any] = field(default_factory=dict)
    built_by: str = ""
    extra_files: list[Path] = field(default_factory=list)  # other files that belong to it (size counted)


class Exporter(Protocol):
    format: str  # registry key and manifest "format"
    runtime: str  # runtime registry key that opens its files
    quants: tuple[str, ...]  # --quant values it supports
    tasks: tuple[str, ...]  # model tasks it exports (keys of architectures.TASK_MODEL_CLASSES)
    requires: tuple[str, ...]  # import names it needs (edgelm doctor checks them)

    def export(self, model: Any, source: SourceModel, bundle_dir: Path, quant: str) -> ExportedArtifact:
        """Write the artifact under bundle_dir/<format>/ and describe it."""

    # Optional: `finish(bundle_dir)` runs once after all of a format's quant recipes, for an
    # exporter that keeps scratch files between them (the ONNX fp32 source, for one).


# format -> module defining `EXPORTER`, imported lazily (exporters pull in heavy libraries).
EXPORTER_MODULES: dict[str, str] = {
    "safetensors": "edgelm.exporters.reference",
    "onnx": "edgelm.exporters.onnx",
    "gguf": "edgelm.exporters.gguf",
    "executorch": "edgelm.exporters.executorch",
    "tflite": "edgelm.exporters.tflite",
}


def missing_requirements(exporter: Exporter) -> list[str]:
    """The import names an exporter needs that are not installed here."""
    import importlib.util

    return [name for name in exporter.requires if importlib.util.find_spec(name) is None]


def get_exporter(fmt: str) -> Exporter:
    if fmt not in EXPORTER_MODULES:
        raise UnsupportedError(
            f"format {fmt!r} has no exporter in this edgelm; available: {', '.join(sorted(EXPORTER_MODULES))}"
        )
    try:
        module = importlib.import_module(EXPORTER_MODULES[fmt])
    except ImportError as err:
        raise UnsupportedError(f"the {fmt} exporter needs {err.name}; install `edgelm[export]`") from err
    return module.EXPORTER


def check_quant(exporter: Exporter, quant: str) -> None:
    if quant not in exporter.quants:
        raise UnsupportedError(
            f"format {exporter.format!r} cannot do --quant {quant}; it supports: {', '.join(exporter.quants)}"
        )
