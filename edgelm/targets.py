"""Target presets, as data: which formats and quant recipes a deployment target gets.

A listed format whose exporter is not installed here (an optional extra) is skipped with a
message saying what to install; the bundle always carries the fp32 reference. A model of
LARGE_MODEL_PARAMETERS or more gets the preset's `large_model_quants` where it lists a format:
fewer, smaller files (a 1B model's int8 copy is 1.3 GB on a phone, its fp32 one 5 GB), each
left out named in the report; an explicit --quant still gets exactly what it asks for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgelm.errors import UnsupportedError

LARGE_MODEL_PARAMETERS = 750_000_000  # Gemma-3-1B (1.0B) and Llama-3.2-1B (1.24B) are large; Qwen2.5-0.5B is not


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    formats: tuple[str, ...]  # in the order a device should prefer them
    quants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # format -> default --quant list
    large_model_quants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the same, at LARGE_MODEL_PARAMETERS
    large_model_reason: str = ""  # why, in the report's list of what was skipped
    delegates: tuple[str, ...] = ()
    abi: str = ""
    max_context: int = 2048

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def quants_for(self, fmt: str, parameters: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the quants this preset builds of `fmt` for a model of `parameters`, those it leaves
        out for the model's size); empty when it lists no quants for `fmt`."""
        usual = self.quants.get(fmt, ())
        if parameters < LARGE_MODEL_PARAMETERS or fmt not in self.large_model_quants:
            return usual, ()
        kept = self.large_model_quants[fmt]
        return kept, tuple(q for q in usual if q not in kept)


TARGETS: dict[str, TargetPreset] = {
    t.name: t
    for t in [
        TargetPreset(
            "android",
            "Android phones (arm64-v8a), CPU with XNNPACK, NNAPI/QNN/GPU delegates where present",
            formats=("gguf", "executorch", "tflite", "onnx"),
            quants={"gguf": ("int4", "int8"), "executorch": ("int4",), "tflite": ("int8",), "onnx": ("int4", "int8")},
            large_model_quants={"gguf": ("int4",), "onnx": ("int4",)},
            large_model_reason="an int8 copy of a model this size is over 1 GB on a phone and doubles the export's "
            "time; the int4 file is kept (--quant int8 asks for it)",
            delegates=("xnnpack", "nnapi", "qnn", "gpu"),
            abi="arm64-v8a",
        ),
        TargetPreset(
            "linux-arm64",
            "ARM64 Linux boards (Raspberry Pi, Jetson CPU), CPU",
            formats=("gguf", "onnx", "executorch", "tflite"),
            quants={"gguf": ("int4",), "onnx": ("int4",), "executorch": ("int4",), "tflite": ("int8",)},
            delegates=("xnnpack",),
            abi="aarch64",
        ),
        TargetPreset(
            "linux-x86_64",
            "x86-64 Linux desktops and servers, CPU",
            formats=("onnx", "gguf"),
            quants={"onnx": ("fp32", "int8"), "gguf": ("int8", "int4")},
            large_model_quants={"onnx": ("int8",)},
            large_model_reason="the fp32 ONNX of a model this size is 4+ GB beside the bundle's fp32 reference; "
            "int8 is kept (--quant fp32 asks for it)",
            delegates=("cpu",),
            abi="x86_64",
        ),
        TargetPreset(
            "ios",
            "iPhone and iPad (arm64), CPU with XNNPACK, Core ML where present",
            formats=("executorch", "gguf"),
            quants={"executorch": ("int4",), "gguf": ("int4",)},
            delegates=("xnnpack", "coreml", "mps"),
            abi="arm64",
        ),
    ]
}


def get_target(name: str) -> TargetPreset:
    if name not in TARGETS:
        raise UnsupportedError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]
