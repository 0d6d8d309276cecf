"""The CLI: exit codes (0 ok, 1 gate, 2 bad input), one-line errors, and a kill-safe export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

EDGELM = [sys.executable, "-m", "edgelm"]


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELM, *args], capture_output=True, text=True, timeout=300, **kwargs)


def _assert_bad_input(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    # progress lines of the steps that finished may precede it; the error is one line, last
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("edgelm: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert pattern in errors[0]
    assert "Traceback" not in result.stderr


def test_garbage_model_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(os.urandom(4096))
    _assert_bad_input(run_cli("export", str(bad), "-o", str(tmp_path / "out")), "not a GGUF file")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_exits_2(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba_xl"}))
    _assert_bad_input(run_cli("export", str(folder), "-o", str(tmp_path / "out")), "not supported")


def test_missing_tokenizer_exits_2(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    (folder / "tokenizer.json").unlink()
    _assert_bad_input(run_cli("export", str(folder), "-o", str(tmp_path / "out")), "no tokenizer")


def test_pickle_checkpoint_exits_2(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    _assert_bad_input(run_cli("export", str(folder), "-o", str(tmp_path / "out")), "--allow-pickle")


def test_sha256_mismatch_exits_2_on_run(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "tokenizer" / "tokenizer.json").write_text("{}")
    _assert_bad_input(run_cli("run", str(copy), "--prompt", "hi"), "sha256 does not match")


def test_unknown_or_unsupported_quant_exits_2(tmp_path):
    _assert_bad_input(run_cli("export", "--quant", "int3", "-o", str(tmp_path / "o")), "recipes: fp32, fp16")
    _assert_bad_input(
        run_cli("export", "--formats", "safetensors", "--quant", "int4", "-o", str(tmp_path / "o")), "supports: fp32"
    )
    _assert_bad_input(run_cli("export", "--formats", "coreml", "-o", str(tmp_path / "o")), "no exporter")


def test_run_streams_text_and_exits_0(tiny_bundle):
    result = run_cli("run", str(tiny_bundle), "--prompt", "Hello", "--max-new-tokens", "8", "--no-chat")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_inspect_and_doctor_and_targets_exit_0(tiny_bundle):
    inspect = run_cli("inspect", str(tiny_bundle))
    assert inspect.returncode == 0 and "reference-fp32" in inspect.stdout
    doctor = run_cli("doctor")
    assert doctor.returncode == 0 and "torch" in doctor.stdout
    assert "android" in run_cli("targets").stdout


def test_failed_gate_exits_1(tiny_llama, tmp_path):
    # A gate below 1.0 is unreachable even for the reference: export must fail with exit 1.
    code = (
        "import sys; from edgelm.cli import main; import edgelm.parity as p; "
        "p.DEFAULT_GATES['fp32'] = 0.5; import edgelm.export as e; e.DEFAULT_GATES['fp32'] = 0.5; main(sys.argv[1:])"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "export",
            str(tiny_llama),
            "-o",
            str(tmp_path / "out"),
            "--no-profile",
            "--formats",
            "gguf",
            "--quant",
            "fp32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "parity gate failed" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sigkill_during_export_leaves_nothing_at_the_output_path(tiny_llama, tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen(
        [*EDGELM, "export", str(tiny_llama), "-o", str(out), "--repeats", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".bundle.partial-") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert proc.poll() is None, "export finished before it could be killed"
    time.sleep(0.5)  # let it write some of the partial bundle
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
