"""The protocol every format exporter implements, and the registry that finds them.

An exporter writes one artifact for one quant recipe into the bundle folder and says
what it did; the pipeline (edgelm.export) then opens it through its runtime, measures
parity and profiles it. Adding a format is one module in exporters/ plus one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgelm.errors import UnsupportedError
from edgelm.model import SourceModel


@dataclass
class ExportedArtifact:
    path: Path  # the file a runtime opens (inside the bundle folder)
    quant: str
    signature: dict[str, Any] = field(default_factory=dict)
    built_by: str = ""
    extra_files: list[Path] = field(default_factory=list)  # other files that belong to it (size counted)


class Exporter:
    """What every format exporter is, and the hooks the pipeline calls on it (defaults: none).
    edgelm.export and edgelm.artifacts name no format: what differs per format lives here."""

    format: str  # registry key and manifest "format"
    runtime: str  # runtime registry key that opens its files
    quants: tuple[str, ...]  # --quant values it supports
    tasks: tuple[str, ...]  # model tasks it exports (keys of architectures.TASK_MODEL_CLASSES)
    requires: tuple[str, ...]  # import names it needs (edgelm doctor checks them)
    exports_in_background: bool = False  # slow single-threaded lowering: run in a worker (edgelm.background)
    # The worker's niceness. 19 by default: the export's own multithreaded steps (calibration,
    # parity) stall on any thread that loses its core, so a worker takes what they leave
    # (measured on 2 cores: at equal priority, calibration and the reference's parity took 2.5x
    # as long). The longest lowering takes less (see ExecuTorch's) so that, of two workers, it
    # gets the spare core first: the export waits for the last worker to finish.
    background_nice: int = 19
    gptq: tuple[str, ...] = ()  # recipes whose calibrated attempts take the layers' Hessians (edgelm.gptq)
    mixed_precision: tuple[str, ...] = ()  # recipes that can keep chosen layers at 8 bits (layers_8bit)
    # recipes whose file type the exporter picks by measured error on calibration token windows
    # (calibration_windows), when the export calibrates
    measured_choice: tuple[str, ...] = ()
    fallbacks: ClassVar[dict[str, tuple[str, ...]]] = {}  # recipe -> the format's more faithful types, in order
    own_options: ClassVar[dict[str, str]] = {}  # ExportOptions field -> its flag, meaningful for this format only

    def export(
        self, model: Any, source: SourceModel, bundle_dir: Path, quant: str, **settings: Any
    ) -> ExportedArtifact:
        """Write the artifact under bundle_dir/<format>/ and describe it."""
        raise NotImplementedError

    def gate_recipe(self, quant: str) -> str:
        """The --quant recipe whose gate an artifact of `quant` is held to (a format's own type maps to one)."""
        return quant

    def planned_quants(self, options: Any) -> list[str]:
        """Artifacts this format adds from its own options (GGUF's --gguf-type), validated."""
        return []

    def check_options(self, options: Any) -> None:
        """Refuse this format's own options (`own_options`) before any model is loaded."""

    def finish(self, bundle_dir: Path) -> None:
        """Runs once after all of the format's recipes (drop scratch files kept between them)."""


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
