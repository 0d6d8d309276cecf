"""GGUF: the writer (per-architecture table + tokenizer metadata), llama.cpp's quantizer,
the llama.cpp runtime, and hostile files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import fast_export_options

import edgelm
from edgelm.errors import DeviceError, InvalidModelError, UnsupportedError
from edgelm.export import export_bundle

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the gguf extra) is not installed")
pytest.importorskip("gguf", reason="the gguf package is not installed")

# max |logit diff| vs torch for the F32 file. Gemma's GELU runs through ggml's fp16 lookup
# table on CPU (GGML_GELU_FP16), so Gemma3 gets an fp16-level bound; SiLU models are exact.
FP32_TOLERANCE = {"llama": 1e-4, "qwen2": 1e-4, "gemma3": 1e-3}


@pytest.fixture(scope="module")
def gguf_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "bundle"
    export_bundle(tiny_llama, out, fast_export_options(formats=("gguf",), quants=("fp32", "fp16", "int8", "int4")))
    return out


@pytest.mark.parametrize("kind", sorted(FP32_TOLERANCE))
def test_decoders_round_trip_through_llama_cpp(tiny_model_factory, tmp_path, kind):
    manifest = export_bundle(
        tiny_model_factory(kind),
        tmp_path / kind,
        fast_export_options(formats=("gguf",), quants=("fp32", "fp16"), profile=False),
    )
    by_quant = {a.quant: a for a in manifest.artifacts if a.format == "gguf"}
    assert by_quant["fp32"].parity["max_abs_logit_diff_first_window"] <= FP32_TOLERANCE[kind]
    assert by_quant["fp32"].parity["greedy_match_tokens"] == 64
    assert by_quant["fp16"].parity["max_abs_logit_diff_first_window"] <= 5e-3
    assert all(a.parity["passed"] for a in manifest.artifacts)
    assert by_quant["fp32"].path == "gguf/model-F32.gguf" and by_quant["fp16"].path == "gguf/model-F16.gguf"


def test_bert_embeddings_round_trip_through_llama_cpp(tiny_model_factory, tmp_path):
    manifest = export_bundle(
        tiny_model_factory("bert"),
        tmp_path / "bert",
        fast_export_options(formats=("gguf",), quants=("fp32", "int8"), profile=False),
    )
    entry = manifest.artifact("gguf-fp32")
    assert entry.parity["max_abs_diff"] <= 1e-4 and entry.parity["passed"]
    encoder = edgelm.load(tmp_path / "bert", format="gguf-int8")
    vectors = encoder.embed(["first text", "a second, longer text"])
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=-1), 1, atol=1e-5)


def test_a_classifier_is_not_exported_to_gguf(tiny_model_factory, tmp_path):
    with pytest.raises(UnsupportedError, match="text-classification"):
        export_bundle(tiny_model_factory("bert-cls"), tmp_path / "cls", fast_export_options(formats=("gguf",)))


def test_quant_recipes_map_to_llama_cpp_types_and_pass_their_gates(gguf_bundle):
    from edgelm.bundle import read_bundle
    from edgelm.gguf_header import read_gguf_summary

    manifest = read_bundle(gguf_bundle)
    files = {a.quant: gguf_bundle / a.path for a in manifest.artifacts if a.format == "gguf"}
    assert {q: p.name for q, p in files.items()} == {
        "fp32": "model-F32.gguf",
        "fp16": "model-F16.gguf",
        "int8": "model-Q8_0.gguf",
        "int4": "model-Q4_K_M.gguf",  # a random float model: Q4_K_M stays closer to it than Q4_1
    }
    int4 = next(a for a in manifest.artifacts if a.quant == "int4").signature["quantization"]
    scores = int4["chosen_by"]["mean_kl_from_source_on_calibration_text"]
    assert set(scores) == {"Q4_K_M", "Q4_1"} and 0 < scores["Q4_K_M"] < scores["Q4_1"]
    # general.file_type: 0 all F32, 1 F16, 7 Q8_0, 15 Q4_K_M (llama_ftype)
    file_types = {q: read_gguf_summary(p).metadata["general.file_type"] for q, p in files.items()}
    assert file_types == {"fp32": 0, "fp16": 1, "int8": 7, "int4": 15}
    q8_types = {t.ggml_type for t in read_gguf_summary(files["int8"]).tensors if len(t.shape) == 2}
    assert 8 in q8_types  # GGML_TYPE_Q8_0
    assert all(a.parity["passed"] for a in manifest.artifacts)
    assert not list((gguf_bundle / "gguf").glob(".*"))  # the F32 scratch file is gone


def test_int4_of_weights_on_a_q4_1_grid_is_written_as_q4_1_exactly(tiny_model_factory, tmp_path):
    """The default model's weights came from a Q4_1 file: with every layer on Q4_1's grid, int4
    is Q4_1 (lossless) without measuring the other type — and measuring agrees."""
    import shutil

    import torch
    import transformers

    from edgelm.exporters.gguf import INT4_TYPES, quantize_best, write_f32_gguf
    from edgelm.model import inspect_source

    source = tmp_path / "on-grid"
    shutil.copytree(tiny_model_factory("llama"), source)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:  # blocks of 32 along the input dimension, as GGUF stores rows
                parameter.copy_(_on_q4_1_grid(parameter))
    model.save_pretrained(str(source))
    manifest = export_bundle(source, tmp_path / "bundle", fast_export_options(formats=("gguf",), quants=("int4",)))
    entry = manifest.artifact("gguf")
    assert entry.path == "gguf/model-Q4_1.gguf" and "already sit on Q4_1's grid" in str(
        entry.signature["quantization"]["chosen_by"]
    )
    assert entry.parity["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
    scratch = tmp_path / "f32.gguf"
    write_f32_gguf(model, inspect_source(source), tmp_path / "bundle" / "tokenizer", scratch)
    windows = [torch.randint(3, 200, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    _, best, scores = quantize_best(model.eval(), scratch, tmp_path, INT4_TYPES, windows)
    assert best == "MOSTLY_Q4_1" and scores["Q4_1"] < scores["Q4_K_M"] / 10


def _on_q4_1_grid(weight):
    """`weight` moved onto a Q4_1 grid: per block of 32, minimum m and step d (both float16), every
    value m + d·q with q in 0..15, and both ends used (so llama.cpp's Q4_1 finds m and d again)."""

    blocks = weight.reshape(-1, 32)
    low, high = blocks.min(dim=1, keepdim=True).values, blocks.max(dim=1, keepdim=True).values
    step = ((high - low) / 15).half().float()
    low = low.half().float()
    codes = ((blocks - low) / step.clamp(min=1e-8)).round().clamp(0, 15)  # a block of zeros (padding) stays zero
    codes[:, 0], codes[:, 1] = 0, 15
    return (low + step * codes).reshape(weight.shape)


def test_llama_cpp_tokenizes_the_parity_text_exactly_like_the_source_tokenizer(gguf_bundle):
    from edgelm.exporters.gguf_vocab import probe_text
    from edgelm.runtimes.llamacpp import tokenize_with_vocab_file
    from edgelm.tokenizer import Tokenizer

    text = probe_text()
    expected = Tokenizer(gguf_bundle / "tokenizer").encode(text, add_special_tokens=False)
    assert tokenize_with_vocab_file(gguf_bundle / "gguf" / "model-Q4_K_M.gguf", text) == expected
    assert len(expected) > 5000


def test_session_decode_matches_prefill_and_generation_matches_the_reference(gguf_bundle):
    session = edgelm.load(gguf_bundle, format="gguf-fp32").session()
    ids = np.array([3, 44, 120, 9, 200, 17], dtype=np.int64)
    session.reset()
    full = session.prefill(ids)
    session.reset()
    session.prefill(ids[:4])
    assert np.abs(session.decode(int(ids[4])) - full[4]).max() < 1e-4
    assert np.abs(session.decode(int(ids[5])) - full[5]).max() < 1e-4
    ref = edgelm.load(gguf_bundle, format="reference-fp32").generate("The object", max_new_tokens=16, ignore_eos=True)
    assert (
        edgelm.load(gguf_bundle, format="gguf-fp32").generate("The object", max_new_tokens=16, ignore_eos=True) == ref
    )


def test_gpu_on_a_cpu_only_build_is_a_clear_error(gguf_bundle):
    from edgelm.runtimes.llamacpp import ADAPTER

    if "gpu" in ADAPTER.available_devices():
        pytest.skip("this llama-cpp-python build has GPU offload")
    with pytest.raises(DeviceError, match="available: cpu"):
        edgelm.load(gguf_bundle, format="gguf-int4", device="gpu")


def _one_tensor_gguf(path) -> bytes:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("t", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _patch_tensor_info(data: bytes, *, ggml_type: int | None = None, offset: int | None = None) -> bytes:
    """Rewrite the type or data offset of tensor "t" (name len u64, name, n_dims u32, dim u64, type u32, offset u64)."""
    start = data.index(struct.pack("<Q", 1) + b"t" + struct.pack("<I", 1)) + 8 + 1 + 4 + 8
    out = bytearray(data)
    if ggml_type is not None:
        out[start : start + 4] = struct.pack("<I", ggml_type)
    if offset is not None:
        out[start + 4 : start + 12] = struct.pack("<Q", offset)
    return bytes(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(ggml_type=999), "unknown type"),
        (dict(offset=1 << 40), "past the end"),
        (dict(offset=(1 << 63) - 8), "past the end"),
    ],
)
def test_hostile_tensor_infos_are_refused_before_llama_cpp_parses_them(tmp_path, change, message):
    from edgelm.runtimes.llamacpp import ADAPTER

    path = tmp_path / "hostile.gguf"
    path.write_bytes(_patch_tensor_info(_one_tensor_gguf(tmp_path / "ok.gguf"), **change))
    with pytest.raises(InvalidModelError, match=message):
        ADAPTER.open(path)


def test_truncated_gguf_artifact_is_refused_by_the_runtime(gguf_bundle, tmp_path):
    from edgelm.runtimes.llamacpp import ADAPTER

    data = (gguf_bundle / "gguf" / "model-Q8_0.gguf").read_bytes()
    for cut in (3, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidModelError):
            ADAPTER.open(path)


def test_any_llama_cpp_type_by_name_is_exported_and_gated_like_its_closest_recipe(tiny_llama, tmp_path):
    options = fast_export_options(
        formats=("gguf",), quants=("int8",), gguf_types=("q4_0", "IQ4_NL", "Q6_K"), profile=False
    )
    manifest = export_bundle(tiny_llama, tmp_path / "types", options)
    by_name = {a.name: a for a in manifest.artifacts}
    assert {"gguf-int8", "gguf-Q4_0", "gguf-IQ4_NL", "gguf-Q6_K"} <= set(by_name)
    assert by_name["gguf-Q4_0"].path == "gguf/model-Q4_0.gguf"
    assert by_name["gguf-Q4_0"].parity["gate"] == options.gates["int4"]
    assert by_name["gguf-Q6_K"].parity["gate"] == options.gates["int8"]
    assert by_name["gguf-IQ4_NL"].signature["quantization"]["llama_cpp_file_type"] == "MOSTLY_IQ4_NL"
    assert all(a.parity["passed"] for a in manifest.artifacts)


def test_an_unknown_gguf_type_names_the_known_ones(tiny_llama, tmp_path):
    with pytest.raises(UnsupportedError, match="Q4_K_M"):
        export_bundle(tiny_llama, tmp_path / "bad", fast_export_options(formats=("gguf",), gguf_types=("Q3_X",)))
    with pytest.raises(UnsupportedError, match="--gguf-type only applies to gguf"):
        export_bundle(tiny_llama, tmp_path / "bad", fast_export_options(formats=("onnx",), gguf_types=("Q4_0",)))
    with pytest.raises(UnsupportedError, match="--delegate only applies to executorch"):
        export_bundle(tiny_llama, tmp_path / "bad", fast_export_options(formats=("onnx",), delegate="xnnpack"))
    assert not (tmp_path / "bad").exists()


def test_a_sentencepiece_style_vocabulary_is_written_as_llama_cpp_spm_and_tokenizes_identically(
    tiny_model_factory, tmp_path
):
    from edgelm.exporters.gguf_vocab import probe_text
    from edgelm.gguf_header import read_gguf_summary
    from edgelm.runtimes.llamacpp import tokenize_with_vocab_file
    from edgelm.tokenizer import Tokenizer

    manifest = export_bundle(
        tiny_model_factory("llama-spm"),
        tmp_path / "spm",
        fast_export_options(formats=("gguf",), quants=("fp32",), profile=False),
    )
    path = tmp_path / "spm" / "gguf" / "model-F32.gguf"
    assert read_gguf_summary(path).metadata["tokenizer.ggml.model"] == "llama"
    text = probe_text()  # includes CJK and emoji, which only byte fallback can encode with this vocabulary
    expected = Tokenizer(tmp_path / "spm" / "tokenizer").encode(text, add_special_tokens=False)
    assert tokenize_with_vocab_file(path, text) == expected
    assert manifest.artifact("gguf-fp32").parity["max_abs_logit_diff_first_window"] <= 1e-4
