"""The Android sample app's contract with `edgelm export`.

The app's plain-JVM module (examples/android/bundle) is compiled and unit-tested with the JDK and
JUnit, including the contract test that reads the android-preset bundle of a tiny model with the
vendor runtime versions installed here — a bundle-format change that would break the app fails
here. And the manifest is checked from Python for everything the app reads, per artifact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from edgelm.targets import get_target
from edgelm.tokenizer import Tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "android" / "run_tests.sh"
JARS = ("gson.jar", "junit4.jar", "hamcrest-core.jar")
# the app's VendorRuntime rows and the Python package the export's vendor check ran for each
APP_RUNTIMES = {
    "EXECUTORCH": ("executorch", "executorch"),
    "LITERT_LM": ("tflite", "litert-lm-api"),
    "ORT_GENAI": ("onnx", "onnxruntime-genai"),
    "LLAMA_CPP": ("gguf", "llama_cpp_python"),
}


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def test_the_manifest_carries_what_the_app_reads_for_every_android_artifact(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    generation = manifest["generation"]
    assert generation["eos_token_ids"] and all(isinstance(i, int) for i in generation["eos_token_ids"])
    chat = generation["chat"]
    assert set(chat) == {"first_user_prefix", "user_suffix", "next_user_prefix", "bos_token"}, chat
    # the turn strings put together are exactly what the template renders, for one turn and for three
    tokenizer = Tokenizer(tiny_bundle / manifest["tokenizer"]["path"])
    one = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert chat["first_user_prefix"] + "Hi there" + chat["user_suffix"] == one
    conversation = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    app_text = one + "Hello!" + chat["next_user_prefix"] + "What is 2+2?" + chat["user_suffix"]
    assert app_text == tokenizer.apply_chat_template(conversation)
    formats = {fmt for fmt in get_target("android").formats}
    by_format = {a["format"]: a for a in manifest["artifacts"]}
    assert formats <= set(by_format), f"the tiny android bundle lacks {formats - set(by_format)}"
    for entry in manifest["artifacts"]:
        if entry["format"] not in formats:
            continue
        assert entry["path"] in manifest["files"]
        if entry["format"] != "gguf":  # a GGUF's context length is in its own header
            assert entry["signature"]["max_context"] > 0
        assert entry["parity"]["passed"]
        check = entry["vendor_runtimes"][0]
        expected = next(package for fmt, package in APP_RUNTIMES.values() if fmt == entry["format"])
        assert check["package"] == expected and check["result"] == "passed"
        assert check["version"] == _installed(expected.replace("_", "-")), check
        assert all(f in manifest["files"] for f in check["files"]), check["files"]
    # the files each vendor runtime loads on a phone are in the bundle
    assert any(f.endswith("genai_config.json") for f in by_format["onnx"]["vendor_runtimes"][0]["files"])
    assert any(f.endswith(".litertlm") for f in by_format["tflite"]["vendor_runtimes"][0]["files"])


def test_the_app_module_compiles_and_passes_its_tests_on_a_real_bundle(tiny_bundle):
    if shutil.which("javac") is None:
        pytest.skip("no JDK here (apt-get install default-jdk-headless); .ci/run installs it")
    missing = [jar for jar in JARS if not (Path("/usr/share/java") / jar).exists()]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install junit4 libgoogle-gson-java); .ci/run installs them")
    runtimes = ",".join(
        f"{row}={_installed(package.replace('_', '-'))}"
        for row, (fmt, package) in APP_RUNTIMES.items()
        if row != "LLAMA_CPP" and _installed(package.replace("_", "-"))  # the app has no llama.cpp build
    )
    command = ["bash", str(SCRIPT), str(tiny_bundle), runtimes]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "OK (11 tests)" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
