"""device_tests/: run bundles on a real (or emulated) device through edgelm's transports.

    pytest device_tests --device chroot:/var/cache/edgelm/arm64-root
    EDGELM_DEVICE=ssh://pi@raspberrypi pytest device_tests
    EDGELM_DEVICE=adb:SERIAL pytest device_tests

Every test skips, with the reason, when no device is given or it does not answer. The
device needs a runtime-only edgelm (scripts/build_arm64_device.sh makes one for chroot:).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models, shared with the unit tests


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=os.environ.get("EDGELM_DEVICE", ""),
        help="device address: chroot:PATH, ssh://user@host[:port], adb:SERIAL (or EDGELM_DEVICE)",
    )


@pytest.fixture(scope="session")
def transport(request):
    from edgelm.device_profile import device_python
    from edgelm.devices import describe, open_device
    from edgelm.errors import DeviceError

    address = request.config.getoption("--device")
    if not address:
        pytest.skip("no device given (--device ADDRESS or EDGELM_DEVICE)")
    try:
        device = open_device(address)
        describe(device)
        device.run([device_python(), "-c", "import edgelm"], timeout=300)
    except DeviceError as err:
        pytest.skip(f"device {address} is not usable: {err}")
    return device


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    from tiny_models import build_tiny_model

    from edgelm.export import ExportOptions, export_bundle
    from edgelm.parity import ParitySettings

    model = build_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")
    out = tmp_path_factory.mktemp("bundle") / "tiny-llama"
    formats = tuple(f for f in ("onnx", "tflite") if _installed(f))
    export_bundle(
        model,
        out,
        ExportOptions(
            formats=formats,
            quants=("fp32",),
            profile=False,
            parity=ParitySettings(max_tokens=256, window=64, stride=64),
        ),
    )
    return out


def _installed(fmt: str) -> bool:
    from edgelm.exporter import get_exporter, missing_requirements

    return not missing_requirements(get_exporter(fmt))
