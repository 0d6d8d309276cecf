"""The Android sample app's plain-JVM module (examples/android/bundle): compiled and unit-tested
with the JDK and JUnit, including the contract test that reads a real bundle written by
`edgelm export --target android` of a tiny model — a bundle-format change that would break
the app fails here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import fast_export_options

from edgelm.export import export_bundle

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "android" / "run_tests.sh"
JARS = ("gson.jar", "junit4.jar", "hamcrest-core.jar")


def test_the_app_module_compiles_and_passes_its_tests_on_a_real_bundle(tiny_llama, tmp_path):
    if shutil.which("javac") is None:
        pytest.skip("no JDK here (apt-get install default-jdk-headless); .ci/run installs it")
    missing = [jar for jar in JARS if not (Path("/usr/share/java") / jar).exists()]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install junit4 libgoogle-gson-java); .ci/run installs them")
    pytest.importorskip("onnxruntime")
    bundle = tmp_path / "bundle"
    export_bundle(
        tiny_llama, bundle, fast_export_options(target="android", formats=("onnx",), quants=("int8",), profile=False)
    )
    done = subprocess.run(["bash", str(SCRIPT), str(bundle)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "OK (6 tests)" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
