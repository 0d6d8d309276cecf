"""Target presets, as data: which formats and quant recipes a deployment target gets.

A listed format whose exporter is not installed here (an optional extra) is skipped with a
message saying what to install; the bundle always carries the fp32 reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgelm.errors import UnsupportedError


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    formats: tuple[str, ...]  # in the order a device should prefer them
    quants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # format -> default --quant list
    delegates: tuple[str, ...] = ()
    abi: str = ""
    max_context: int = 2048

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TARGETS: dict[str, TargetPreset] = {
    t.name: t
    for t in [
        TargetPreset(
            "android",
            "Android phones (arm64-v8a), CPU with XNNPACK, NNAPI/QNN/GPU delegates where present",
            formats=("gguf", "executorch", "tflite", "onnx"),
            quants={"gguf": ("int4", "int8"), "executorch": ("int4",), "tflite": ("int8",), "onnx": ("int4", "int8")},
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
