"""Hostile and careless input: the bundle is a boundary, every parser's work is bounded, and
every failure bad input can cause is one EdgeLMError line with exit 2 (exit 3 is a bug)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fast_export_options

from edgelm.bundle import read_bundle
from edgelm.errors import (
    BundleError,
    EdgeLMError,
    InvalidModelError,
    PromptError,
    TokenizerError,
    UnsupportedError,
)

EDGELM = [sys.executable, "-m", "edgelm"]


def run_cli(*args: str | bytes, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELM, *args], capture_output=True, timeout=timeout, check=False)


def assert_exit_2(result: subprocess.CompletedProcess, pattern: str = "") -> None:
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("edgelm: error:") and "Traceback" not in stderr, stderr
    assert sum(line.startswith("edgelm: error:") for line in lines) == 1
    assert pattern in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def bundle(tiny_llama, tmp_path_factory) -> Path:
    """A bundle with the reference and a GGUF artifact (no profile: quick)."""
    pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("hostile") / "bundle"
    from edgelm.export import export_bundle

    export_bundle(tiny_llama, out, fast_export_options(formats=("gguf",), quants=("fp32",), profile=False))
    return out


def tampered(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def gguf_artifact(manifest: dict) -> dict:
    return next(a for a in manifest["artifacts"] if a["format"] == "gguf")


# --- the bundle is a boundary ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "../outside.gguf",
        "/tmp/outside.gguf",
        "gguf/../../outside.gguf",
        "./model.gguf",
        "gguf//model.gguf",
        "C:/x.gguf",
        "gguf\\..\\x.gguf",
    ],
)
def test_artifact_paths_that_leave_the_bundle_are_refused_before_anything_opens(bundle, tmp_path, path):
    import edgelm

    outside = tmp_path / "outside.gguf"
    shutil.copy(bundle / gguf_artifact(json.loads((bundle / "manifest.json").read_text()))["path"], outside)

    def edit(manifest, folder):
        artifact = gguf_artifact(manifest)
        manifest["files"][path] = artifact["sha256"]
        artifact["path"] = path

    copy = tampered(bundle, tmp_path, edit)
    with pytest.raises(BundleError, match="not a plain relative path"):
        edgelm.load(copy, format="gguf", verify=False)
    assert_exit_2(run_cli("inspect", str(copy)), "not a plain relative path")


def test_tokenizer_path_outside_the_bundle_is_refused(bundle, tmp_path):
    import edgelm

    def edit(manifest, folder):
        shutil.copytree(folder / "tokenizer", tmp_path / "tok")
        manifest["tokenizer"]["path"] = "../tok"

    with pytest.raises(BundleError, match="tokenizer path"):
        edgelm.load(tampered(bundle, tmp_path, edit))


def test_a_symlink_to_a_file_outside_is_refused(bundle, tmp_path):
    import edgelm

    def edit(manifest, folder):
        artifact = gguf_artifact(manifest)
        real = folder / artifact["path"]
        shutil.move(real, tmp_path / "outside.gguf")
        real.symlink_to(tmp_path / "outside.gguf")

    with pytest.raises(BundleError, match="outside the bundle"):
        edgelm.load(tampered(bundle, tmp_path, edit), format="gguf")


def test_a_files_key_that_climbs_out_is_refused_by_inspect_and_push(bundle, tmp_path):
    from edgelm.devices import LocalTransport
    from edgelm.push import push_bundle

    (tmp_path / "outside.txt").write_text("secret")

    def edit(manifest, folder):
        manifest["files"]["tokenizer/../../outside.txt"] = "0" * 64

    copy = tampered(bundle, tmp_path, edit)
    assert_exit_2(run_cli("inspect", str(copy)), "not a plain relative path")
    device = tmp_path / "device"
    with pytest.raises(BundleError):
        push_bundle(copy, LocalTransport(), str(device / "b"))
    assert not device.exists() or not any(device.rglob("outside.txt"))


def test_an_artifact_missing_from_files_or_with_another_sha256_is_refused(bundle, tmp_path):
    import edgelm

    def drop(manifest, folder):
        del manifest["files"][gguf_artifact(manifest)["path"]]

    with pytest.raises(BundleError, match="not in files"):
        edgelm.load(tampered(bundle, tmp_path, drop), format="gguf")
    shutil.rmtree(tmp_path / "b")

    def other_hash(manifest, folder):
        gguf_artifact(manifest)["sha256"] = "a" * 64

    with pytest.raises(BundleError, match="not in files"):
        edgelm.load(tampered(bundle, tmp_path, other_hash), format="gguf")


def test_an_unlisted_tokenizer_file_is_refused(bundle, tmp_path):
    import edgelm

    def edit(manifest, folder):
        manifest["files"].pop("tokenizer/chat_template.jinja", None)
        manifest["files"].pop("tokenizer/tokenizer_config.json", None)
        (folder / "tokenizer" / "chat_template.jinja").write_text("{{ 'injected' }}")

    with pytest.raises(BundleError, match="not listed"):
        edgelm.load(tampered(bundle, tmp_path, edit))


# --- hangs and memory ----------------------------------------------------------------------


def _tflite_with_aliased_tensors(path: Path, rank: int, tensors: int, subgraphs: int = 1) -> None:
    """A small .tflite whose tensor and subgraph vectors point at one table many times."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    b = flatbuffers.Builder(1024)

    def repeated(offset: int, times: int) -> int:  # a vector whose every entry is the same table
        b.StartVector(4, times, 4)
        for _ in range(times):
            b.PrependUOffsetTRelative(offset)
        return b.EndVector()

    shape = b.CreateNumpyVector(__import__("numpy").ones(rank, dtype="int32"))
    schema.TensorStart(b)
    schema.TensorAddShape(b, shape)
    tensor_vec = repeated(schema.TensorEnd(b), tensors)
    schema.SubGraphStart(b)
    schema.SubGraphAddTensors(b, tensor_vec)
    subgraph_vec = repeated(schema.SubGraphEnd(b), subgraphs)
    schema.BufferStart(b)
    buffers = repeated(schema.BufferEnd(b), 1)
    schema.ModelStart(b)
    schema.ModelAddVersion(b, 3)
    schema.ModelAddSubgraphs(b, subgraph_vec)
    schema.ModelAddBuffers(b, buffers)
    b.Finish(schema.ModelEnd(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))


@pytest.mark.parametrize("rank,tensors,subgraphs", [(40_000, 4_000, 1), (8, 4_000, 4_000)])
def test_aliased_tflite_tables_are_refused_in_linear_time(tmp_path, rank, tensors, subgraphs):
    pytest.importorskip("ai_edge_litert")
    from edgelm.tflite_file import read_tflite

    path = tmp_path / "model.tflite"
    _tflite_with_aliased_tensors(path, rank, tensors, subgraphs)
    assert path.stat().st_size < 200_000
    started = time.monotonic()
    with pytest.raises(InvalidModelError):
        read_tflite(path)
    assert time.monotonic() - started < 10  # a product of counts took minutes before


def _gguf(path: Path, kvs: list[bytes], n_tensors: int = 0, tail: bytes = b"") -> None:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs) + tail)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_a_huge_scalar_metadata_array_is_skipped_not_parsed(tmp_path):
    from edgelm.gguf_header import read_gguf_summary

    n = 40_000_000
    path = tmp_path / "model.gguf"
    _gguf(
        path,
        [
            _key("general.architecture") + struct.pack("<IQ", 8, 5) + b"llama",
            _key("x.big") + struct.pack("<IIQ", 9, 0, n) + bytes(n),
        ],
    )
    started = time.monotonic()
    summary = read_gguf_summary(path)
    assert summary.metadata["x.big"]["array_length"] == n
    assert time.monotonic() - started < 5  # item by item, 40M items took 16 s here (0.007 s skipped)


def test_hostile_gguf_metadata_is_invalid_model_error(tmp_path):
    from edgelm.gguf_header import read_gguf_summary

    path = tmp_path / "model.gguf"
    cases = {
        "alignment string": [_key("general.alignment") + struct.pack("<IQ", 8, 3) + b"abc"],
        "alignment zero": [_key("general.alignment") + struct.pack("<II", 4, 0)],
        "alignment not power of two": [_key("general.alignment") + struct.pack("<II", 4, 48)],
        "nested arrays": [
            _key("x") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 3 + struct.pack("<IQ", 0, 1) + b"\0"
        ],
        "string array too long": [_key("x") + struct.pack("<IIQ", 9, 8, 5_000_000) + bytes(8 * 5_000_000)],
        "unknown item type": [_key("x") + struct.pack("<IIQ", 9, 77, 1) + bytes(8)],
    }
    for name, kvs in cases.items():
        _gguf(path, kvs)
        with pytest.raises(InvalidModelError, match="GGUF"):
            read_gguf_summary(path)
        assert name
        result = run_cli("inspect", str(path))
        assert_exit_2(result)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_a_model_is_refused_not_read(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    assert_exit_2(run_cli("inspect", str(fifo), timeout=60), "not a regular file")
    assert_exit_2(run_cli("export", str(fifo), "-o", str(tmp_path / "o"), timeout=60), "not a regular file")
    os.mkfifo(tmp_path / "model.tflite")
    assert_exit_2(run_cli("inspect", str(tmp_path / "model.tflite"), timeout=60), "not a regular file")


NASTY_TEMPLATES = {
    "nested range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested output": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
    "string repeat": "{{ 'x' * 10000000000 }}",
    "list repeat": "{{ [1, 2] * 1000000000 }}",
    "power": "{{ 10 ** 10000000 }}",
    "float overflow": "{{ 10.0 ** 1000 }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "center": "{{ 'x' | center(2000000000) }}",
    "format width": "{{ '%2000000000d' | format(1) }}",
    "attribute escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "syntax": "{% for %}",
    "raise": "{{ raise_exception('no system role') }}",
}


@pytest.mark.parametrize("name", sorted(NASTY_TEMPLATES))
def test_chat_templates_are_bounded(name):
    from edgelm.tokenizer import BoundedTemplate

    started = time.monotonic()
    with pytest.raises(TokenizerError):
        BoundedTemplate(NASTY_TEMPLATES[name]).render(messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 30


def test_a_real_chat_template_still_renders():
    from edgelm.tokenizer import BoundedTemplate

    template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
        "| trim + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    )
    text = BoundedTemplate(template).render(
        messages=[{"role": "user", "content": "hi " * 20_000}], add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>user\nhi hi") and text.endswith("<|im_start|>assistant\n")


def test_a_prompt_longer_than_the_context_is_refused_before_prefill(bundle):
    import edgelm

    lm = edgelm.load(bundle)
    calls = []
    session = lm.session()
    original = session.prefill
    session.prefill = lambda ids: calls.append(len(ids)) or original(ids)
    with pytest.raises(PromptError, match="context holds"):
        lm.generate("word " * 300_000, chat=False, max_new_tokens=2)
    with pytest.raises(PromptError, match="empty"):
        lm.generate("", chat=False, max_new_tokens=2)
    assert calls == []


OUT_OF_VOCABULARY = r"""
import sys
from pathlib import Path
from edgelm.errors import PromptError
from edgelm.session import get_runtime
session = get_runtime(sys.argv[1]).open(Path(sys.argv[2]), threads=1)
vocab = session.capabilities.vocab_size
for call in (lambda: session.prefill([1, vocab]), lambda: session.decode(-1), lambda: session.prefill([1, 1 << 40])):
    session.reset()
    try:
        call()
        print("ran")
    except PromptError as err:
        print("refused:", err)
"""


def test_token_ids_outside_the_vocabulary_are_refused_by_every_decoder_runtime(tiny_bundle):
    """ExecuTorch's quantized embedding kernel aborts the process on such an id (exit 134);
    every decoder session checks ids against its vocabulary first (in a child process here,
    so a regression fails this test instead of killing the test run)."""
    manifest = read_bundle(tiny_bundle)
    runtimes = set()
    for entry in manifest.artifacts:
        if entry.runtime in runtimes:
            continue
        runtimes.add(entry.runtime)
        result = subprocess.run(
            [sys.executable, "-c", OUT_OF_VOCABULARY, entry.runtime, str(tiny_bundle / entry.path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, (entry.name, result.returncode, result.stderr[-500:])
        lines = result.stdout.splitlines()
        assert len(lines) == 3 and all(line.startswith("refused: token id") for line in lines), (entry.name, lines)
    assert {"executorch", "onnxruntime", "llama.cpp", "torch", "litert"} <= runtimes


# --- exit 2, one line, for every bad input ----------------------------------------------------


def test_deep_or_huge_json_in_config_and_manifest_is_exit_2(tiny_llama, bundle, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    for text in (
        "[" * 100_000 + "]" * 100_000,
        '{"model_type": ' + "[" * 500 + "]" * 500 + "}",
        '{"model_type": "llama", "x": ' + "9" * 100_000 + "}",
        '"just a string"',
    ):
        (model / "config.json").write_text(text)
        assert_exit_2(run_cli("inspect", str(model)))
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    for text in ("[" * 100_000, '{"a": ' + "[" * 900 + "]" * 900 + "}", "1" * 5000):
        (copy / "manifest.json").write_text(text)
        assert_exit_2(run_cli("run", str(copy), "-p", "hi"))


@pytest.mark.parametrize(
    "generation,message",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"stop": 5}, "stop"),
        ({"top_k": True}, "top_k"),
        ({"temperature": 1e400}, "finite"),
        ({"stop": [1, 2]}, "stop"),
    ],
)
def test_bad_generation_settings_in_a_manifest_are_exit_2(bundle, tmp_path, generation, message):
    def edit(manifest, folder):
        manifest["generation"].update(generation)

    assert_exit_2(run_cli("run", str(tampered(bundle, tmp_path, edit)), "-p", "hi", "--max-new-tokens", "2"), message)


def test_a_decoder_labelled_as_an_encoder_is_exit_2(bundle, tmp_path):
    def edit(manifest, folder):
        manifest["source"]["task"] = "feature-extraction"

    copy = tampered(bundle, tmp_path, edit)
    assert_exit_2(run_cli("run", str(copy), "-p", "hi"), "not that kind of model")
    shutil.rmtree(copy)

    def unknown(manifest, folder):
        manifest["source"]["task"] = "time-travel"

    assert_exit_2(run_cli("run", str(tampered(bundle, tmp_path, unknown)), "-p", "hi"), "unknown task")


@pytest.mark.parametrize(
    "config,message",
    [("not json {", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"eos_token": 5}', "eos_token must be a string")],
)
def test_a_broken_tokenizer_config_is_exit_2(tiny_llama, tmp_path, config, message):
    from edgelm.tokenizer import Tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tiny_llama / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text(config)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer(folder)


def test_invalid_utf8_and_lone_surrogates_are_exit_2(bundle):
    import edgelm

    assert_exit_2(run_cli("run", str(bundle), "--no-chat", "-p", b"\xff\xfe bad bytes"), "not valid Unicode")
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        edgelm.load(bundle).generate("lone \ud800 surrogate", max_new_tokens=2)


def test_empty_prompt_negative_seed_and_bad_settings_are_exit_2(bundle):
    assert_exit_2(run_cli("run", str(bundle), "--no-chat", "-p", ""), "empty")
    assert_exit_2(run_cli("run", str(bundle), "-p", "hi", "--seed", "-1"), "seed")
    assert_exit_2(run_cli("run", str(bundle), "-p", "hi", "--top-p", "0"), "top_p")


def test_a_zero_byte_onnx_is_not_an_empty_model(tmp_path):
    pytest.importorskip("onnx")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    assert_exit_2(run_cli("inspect", str(path)), "not an ONNX model")


@pytest.mark.parametrize("address", ["ssh://-V", "ssh://-oProxyCommand=touch@x", "adb:-s", "ssh://a b@host"])
def test_device_addresses_that_look_like_options_are_refused(address):
    from edgelm.devices import open_device
    from edgelm.errors import DeviceError

    with pytest.raises(DeviceError):
        open_device(address)


def test_sampling_settings_from_the_api_are_checked():
    from edgelm.sampling import SamplingConfig

    for bad in ({"seed": -1}, {"max_new_tokens": "10"}, {"ignore_eos": 1}, {"repetition_penalty": float("nan")}):
        with pytest.raises(UnsupportedError):
            SamplingConfig.from_dict(bad)
    assert SamplingConfig.from_dict({"stop": "###", "temperature": 1}).stop == ("###",)


def test_read_bundle_refuses_a_manifest_that_is_a_fifo(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    os.mkfifo(folder / "manifest.json")
    with pytest.raises(EdgeLMError):
        read_bundle(folder)
