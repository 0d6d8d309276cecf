"""Push, generate, parity and profile on the device, compared with this machine."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgelm.bundle import read_bundle
from edgelm.device_profile import device_python, profile_on_device
from edgelm.devices import describe
from edgelm.push import push_bundle

HERE = Path(__file__).resolve().parent
FP32_PPL_TOLERANCE = 0.005  # the fp32 parity gate: ppl within 0.5%
# runtimes a runtime-only arm64 device can have, and why the others are not there
NOT_ON_DEVICE = {
    "torch": "the torch reference is never pushed",
    "executorch": "ExecuTorch's Python runtime imports torch (a 427 MB wheel), not in a runtime-only install",
    "llama.cpp": "llama-cpp-python has no aarch64 wheel; it must be compiled for the device",
}


def _run_on_device(transport, remote: str, artifact: str) -> tuple[dict, np.ndarray]:
    script = f"{remote}.on_device.py"
    transport.push(HERE / "on_device.py", script)
    out = f"{remote}.{artifact}"
    transport.run([device_python(), script, remote, artifact, out], timeout=3600)
    with tempfile.TemporaryDirectory() as scratch:
        transport.pull(out + ".json", Path(scratch) / "r.json")
        transport.pull(out + ".npy", Path(scratch) / "r.npy")
        return json.loads((Path(scratch) / "r.json").read_text()), np.load(Path(scratch) / "r.npy")


def _run_here(bundle: Path, artifact: str) -> tuple[dict, np.ndarray]:
    with tempfile.TemporaryDirectory() as scratch:
        out = str(Path(scratch) / "r")
        subprocess.run(
            [sys.executable, str(HERE / "on_device.py"), str(bundle), artifact, out], check=True, timeout=600
        )
        return json.loads(Path(out + ".json").read_text()), np.load(out + ".npy")


def test_the_device_describes_itself(transport):
    record = describe(transport)
    assert record["machine"] not in ("?", "") and record["cores"] and record["memory_gb"]


def test_generate_and_parity_on_the_device_match_this_machine(transport, tiny_bundle):
    remote = f"/tmp/edgelm-device-tests/{tiny_bundle.name}"
    result = push_bundle(tiny_bundle, transport, remote)
    assert result.artifacts, "nothing was pushed"
    for entry in read_bundle(tiny_bundle).artifacts:
        if entry.runtime in NOT_ON_DEVICE:
            continue
        there, there_logits = _run_on_device(transport, remote, entry.name)
        here, here_logits = _run_here(tiny_bundle, entry.name)
        assert there["greedy"] == here["greedy"], entry.name
        assert abs(there["perplexity"] / here["perplexity"] - 1) <= FP32_PPL_TOLERANCE, (entry.name, there, here)
        assert np.abs(there_logits - here_logits).max() <= 1e-3, entry.name
        assert there["device"]["machine"] == describe(transport)["machine"]


@pytest.mark.parametrize("runtime", sorted(NOT_ON_DEVICE))
def test_runtimes_without_a_device_install_are_named(runtime):
    pytest.skip(f"{runtime}: {NOT_ON_DEVICE[runtime]}")


def test_profile_on_the_device_adds_a_labelled_report_row(transport, tiny_bundle, tmp_path):
    import shutil

    bundle = tmp_path / tiny_bundle.name
    shutil.copytree(tiny_bundle, bundle)
    remote = f"/tmp/edgelm-device-tests/{bundle.name}-profile"
    push_bundle(bundle, transport, remote, formats=("onnx-fp32",))
    entry = profile_on_device(bundle, transport, remote, formats=("onnx-fp32",), new_tokens=8, repeats=1)
    assert entry["profiles"]["onnx-fp32"]["decode_tok_s"] > 0
    assert entry["device"]["machine"] == describe(transport)["machine"]
    rows = json.loads((bundle / "report" / "report.json").read_text())["rows"]
    assert any(f"@ {transport.address}" in row["artifact"] for row in rows)
