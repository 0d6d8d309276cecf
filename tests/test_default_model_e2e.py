"""End to end on the bundled SmolLM2-135M-Instruct: the README's first command, for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2_bundle(tmp_path_factory) -> Path:
    """The README's first command, run here; EDGELM_E2E_BUNDLE names a bundle that command
    already wrote, for re-running these checks without another half-hour export."""
    import os

    if os.environ.get("EDGELM_E2E_BUNDLE"):
        return Path(os.environ["EDGELM_E2E_BUNDLE"])
    out = tmp_path_factory.mktemp("dist") / "smollm2"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgelm",
            "export",
            "--target",
            "android",
            "-o",
            str(out),
            "--repeats",
            "1",
            "--new-tokens",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference-fp32" in result.stdout  # the table is printed
    return out


def test_export_writes_a_bundle_with_the_reference_row(smollm2_bundle):
    for rel in ["manifest.json", "tokenizer/tokenizer.json", "README.md", "report/report.html"]:
        assert (smollm2_bundle / rel).is_file(), rel
    from edgelm.bundle import read_bundle

    manifest = read_bundle(smollm2_bundle)
    ref = manifest.artifact("safetensors")
    # peers measured 14.715 on the same text (the README's peer baselines); the fp32 reference must agree
    assert ref.parity["perplexity"] == pytest.approx(14.715, rel=0.01)
    assert ref.parity["tokens_scored"] >= 4000
    assert ref.profile["decode_tok_s"] > 0 and ref.profile["peak_rss_mb"] > 100
    # tied embeddings stored once: the fp32 file is no larger than the weights
    assert ref.bytes < 4 * manifest.source["num_parameters"] * 1.01
    assert manifest.target == "android"
    rows = json.loads((smollm2_bundle / "report" / "report.json").read_text())["rows"]
    assert rows[0]["perplexity"] == pytest.approx(ref.parity["perplexity"])


def test_android_preset_onnx_artifacts_pass_their_gates_and_beat_fp32_size(smollm2_bundle):
    from edgelm.bundle import read_bundle

    manifest = read_bundle(smollm2_bundle)
    onnx = {a.quant: a for a in manifest.artifacts if a.format == "onnx"}
    assert set(onnx) == {"int4", "int8"}
    for entry in onnx.values():
        assert entry.parity["passed"], entry.parity
        assert entry.parity["top1_agreement"] > 0.9
    reference = manifest.artifact("safetensors")
    assert onnx["int4"].bytes <= 0.35 * reference.bytes
    assert onnx["int4"].profile["decode_tok_s"] > 0  # speed: benchmarks/ (a test runs beside another worker)


def test_onnx_int4_runs_from_the_cli(smollm2_bundle):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgelm",
            "run",
            str(smollm2_bundle),
            "--format",
            "onnx-int4",
            "--prompt",
            "What is a KV cache?",
            "--max-new-tokens",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 15


def test_run_streams_coherent_text(smollm2_bundle):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgelm",
            "run",
            str(smollm2_bundle),
            "--prompt",
            "What is a KV cache?",
            "--max-new-tokens",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    words = result.stdout.lower().split()
    assert len(words) >= 15
    assert "cache" in words or "cache." in words or any(w.startswith("cache") for w in words)


def test_example_script_generates(smollm2_bundle):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate.py"), str(smollm2_bundle)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 10


def test_android_preset_gguf_files_pass_their_gates_and_tokenize_like_the_source(smollm2_bundle):
    from edgelm.bundle import read_bundle
    from edgelm.parity import parity_text
    from edgelm.runtimes.llamacpp import tokenize_with_vocab_file
    from edgelm.tokenizer import Tokenizer

    manifest = read_bundle(smollm2_bundle)
    gguf = {a.quant: a for a in manifest.artifacts if a.format == "gguf"}
    # the default model's weights came from a Q4_1 file: Q4_1 holds them exactly, Q4_K_M does not
    assert {q: a.path for q, a in gguf.items()} == {"int4": "gguf/model-Q4_1.gguf", "int8": "gguf/model-Q8_0.gguf"}
    assert gguf["int4"].parity["ppl_ratio"] < 1.005
    for entry in gguf.values():  # their speed is benchmarks/' business (this runs beside another test worker)
        assert entry.parity["passed"], entry.parity
        assert entry.profile["decode_tok_s"] > 0
    text = parity_text()
    expected = Tokenizer(smollm2_bundle / "tokenizer").encode(text, add_special_tokens=False)
    assert tokenize_with_vocab_file(smollm2_bundle / gguf["int4"].path, text) == expected
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgelm",
            "run",
            str(smollm2_bundle),
            "--format",
            "gguf-int4",
            "--prompt",
            "What is a KV cache?",
            "--max-new-tokens",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and len(result.stdout.split()) >= 15, result.stderr


def test_android_preset_executorch_int4_passes_its_gate_and_is_small(smollm2_bundle):
    from edgelm.bundle import read_bundle

    manifest = read_bundle(smollm2_bundle)
    entry = manifest.artifact("executorch-int4")
    assert entry.path == "executorch/model_8da4w.pte" and entry.runtime == "executorch"
    assert entry.parity["passed"] and entry.parity["top1_agreement"] > 0.85, entry.parity
    reference = manifest.artifact("safetensors")
    assert entry.bytes <= 0.4 * reference.bytes
    assert entry.profile["decode_tok_s"] > 0  # speed: benchmarks/


def test_android_preset_tflite_int8_passes_its_gate_and_is_small(smollm2_bundle):
    from edgelm.bundle import read_bundle

    manifest = read_bundle(smollm2_bundle)
    entry = manifest.artifact("tflite-int8")
    assert entry.path == "tflite/model_int8.tflite" and entry.runtime == "litert"
    assert entry.parity["passed"] and entry.parity["ppl_ratio"] <= 1.03, entry.parity
    reference = manifest.artifact("safetensors")
    assert entry.bytes <= 0.3 * reference.bytes  # weights stored once for both signatures, int8
    assert entry.profile["decode_tok_s"] > 0  # speed: benchmarks/
    assert "tflite" not in manifest.reference.get("skipped_formats", {})


VENDOR_CHECKED = ("executorch-int4", "onnx-int4", "onnx-int8", "gguf-int4", "gguf-int8", "tflite-int8")


def test_each_artifact_runs_to_edgelms_text_in_its_vendors_llm_runtime(smollm2_bundle):
    """ExecuTorch's TextLLMRunner, onnxruntime-genai, llama.cpp's Llama and LiteRT-LM's Engine, each on
    the file as written (LiteRT-LM: the .litertlm packed from it), continue the parity prompt (64
    tokens) greedily to the text edgelm's runtime gives."""
    from edgelm.bundle import read_bundle

    manifest = read_bundle(smollm2_bundle)
    artifacts = {a.name: a for a in manifest.artifacts}
    for name in VENDOR_CHECKED:
        row = artifacts[name].vendor_runtimes[0]
        assert row["result"] == "passed", (name, row)
        assert row["vendor_text"] == row["edgelm_text"] and len(row["edgelm_text"].split()) >= 20, (name, row)


def test_gguf_chat_in_llama_cpp_answers_like_edgelm_run(smollm2_bundle):
    """llama.cpp's own chat API, reading the template, BOS/EOS and end-of-turn from the GGUF alone,
    answers like `edgelm run` with greedy settings."""
    import edgelm
    from edgelm.vendors.llamacpp import GREEDY, open_llama

    question = "What is a KV cache?"
    for name in ("gguf-int4", "gguf-int8"):
        lm = edgelm.load(smollm2_bundle, format=name, threads=2)
        ours = lm.generate(question, chat=True, max_new_tokens=64, temperature=0.0, repetition_penalty=1.0)
        llm = open_llama(smollm2_bundle / lm.artifact.path, 2)
        answer = llm.create_chat_completion(messages=[{"role": "user", "content": question}], max_tokens=64, **GREEDY)[
            "choices"
        ][0]["message"]["content"]
        llm.close()
        lm.close()
        assert answer == ours and len(ours.split()) >= 20, name


def test_tflite_chat_in_litert_lm_answers_like_edgelm_run(smollm2_bundle):
    """LiteRT-LM's own conversation API, reading the chat template, start and stop tokens from the
    .litertlm alone, answers like `edgelm run` with greedy settings."""
    import litert_lm

    import edgelm

    question = "What is a KV cache?"
    lm = edgelm.load(smollm2_bundle, format="tflite-int8", threads=2)
    ours = lm.generate(question, chat=True, max_new_tokens=64, temperature=0.0, repetition_penalty=1.0)
    engine = litert_lm.Engine(
        str((smollm2_bundle / lm.artifact.path).with_suffix(".litertlm")),
        backend=litert_lm.interfaces.CPU(thread_count=2),
        cache_dir=":nocache",  # else LiteRT-LM writes a weight cache beside the model, inside the bundle
        activation_data_type=litert_lm._ffi.ActivationDataType.FLOAT32,
    )
    conversation = engine.create_conversation(
        sampler_config=litert_lm.interfaces.SamplerConfig(top_k=1), max_output_tokens=64
    )
    answer = str(conversation.send_message(question))
    engine.close()
    lm.close()
    assert answer == ours and len(ours.split()) >= 20
