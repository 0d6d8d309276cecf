"""TFLite / LiteRT: the host-cache decoder graph, .tflite export (litert-torch, ai-edge-quantizer
recipes), the LiteRT runtime, and files that are not (whole) TFLite models."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fast_export_options

import edgelm
from edgelm.errors import DeviceError, InvalidModelError, UnsupportedError
from edgelm.export import export_bundle

DECODERS = ["llama", "qwen2", "gemma3", "phi3"]


@pytest.mark.parametrize("kind", DECODERS)
def test_host_cache_graph_matches_transformers_in_chunks_with_garbage_past_the_position(tiny_model_factory, kind):
    """The layout LiteRT runs: the caller's cache in, new keys/values out. Slots past
    input_pos hold large garbage (a previous, longer sequence) that must stay masked."""
    import torch
    import transformers

    from edgelm.graph import build_decoder_graph

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(kind)), dtype=torch.float32).eval()
    graph = build_decoder_graph(model, host_context=64)
    sig = graph.signature
    ids = torch.randint(0, sig.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = [torch.randn(1, sig.num_kv_heads, 64, sig.head_dim) * 100 for _ in range(2 * sig.num_layers)]
    outputs, pos = [], 0
    with torch.no_grad():
        reference = model(ids).logits
        for chunk in (ids[:, :16], ids[:, 16:17], ids[:, 17:30], *[ids[:, i : i + 1] for i in range(30, 40)]):
            logits, *new = graph(chunk, torch.tensor([pos]), *cache)
            for slot, values in zip(cache, new):
                slot[:, :, pos : pos + chunk.shape[1]] = values
            outputs.append(logits)
            pos += chunk.shape[1]
    assert (torch.cat(outputs, dim=1) - reference).abs().max() <= 1e-4


pytest.importorskip("litert_torch", reason="the tflite extra is not installed")


@pytest.fixture(scope="module")
def tflite_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite") / "bundle"
    export_bundle(tiny_llama, out, fast_export_options(formats=("tflite",), quants=("fp32", "fp16", "int8")))
    return out


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_other_decoders_convert_to_tflite_and_match_torch(tiny_model_factory, tmp_path, kind):
    manifest = export_bundle(
        tiny_model_factory(kind),
        tmp_path / kind,
        fast_export_options(formats=("tflite",), quants=("fp32",), profile=False),
    )
    entry = manifest.artifact("tflite-fp32")
    assert entry.parity["max_abs_logit_diff_first_window"] <= 1e-4 and entry.parity["greedy_match_tokens"] == 64


def test_recipes_load_pass_their_gates_and_describe_themselves(tflite_bundle):
    from edgelm.bundle import read_bundle

    manifest = read_bundle(tflite_bundle)
    by_quant = {a.quant: a for a in manifest.artifacts if a.format == "tflite"}
    assert {q: a.path for q, a in by_quant.items()} == {
        "fp32": "tflite/model.tflite",
        "fp16": "tflite/model_fp16.tflite",
        "int8": "tflite/model_int8.tflite",
    }
    assert by_quant["fp32"].parity["max_abs_logit_diff_first_window"] <= 1e-4
    for entry in by_quant.values():
        assert entry.parity["passed"], entry.parity
        assert entry.runtime == "litert" and entry.profile["decode_tok_s"] > 0
        assert entry.signature["max_context"] == 512 and entry.signature["prefill_length"] == 128
    # weights stored once for both signatures, so the quantized files really are smaller
    assert by_quant["int8"].bytes < by_quant["fp16"].bytes < by_quant["fp32"].bytes


def test_prefill_in_chunks_and_decode_match_one_long_prefill(tflite_bundle):
    """Chunked prefill (prompt longer than the prefill signature), decode steps and a reset
    all address the same cache."""
    from edgelm.runtimes.litert import ADAPTER

    session = ADAPTER.open(tflite_bundle / "tflite" / "model.tflite", threads=1)
    ids = np.random.default_rng(0).integers(0, 300, 300)
    whole = session.prefill(ids)  # 128 + 128 + 44
    session.reset()
    parts = np.concatenate([session.prefill(ids[:200]), np.stack([session.decode(int(t)) for t in ids[200:]])])
    assert np.abs(whole - parts).max() <= 1e-4
    with pytest.raises(InvalidModelError, match="512 positions"):
        session.prefill(np.zeros(300, dtype=np.int64))
    session.close()


def test_text_matches_the_reference_through_edgelm_load(tflite_bundle):
    model = edgelm.load(tflite_bundle, format="tflite-fp32")
    reference = edgelm.load(tflite_bundle, format="reference-fp32")
    prompt = "The parity text"
    assert model.generate(prompt, max_new_tokens=12) == reference.generate(prompt, max_new_tokens=12)


@pytest.mark.parametrize("kind", ["bert", "bert-cls"])
def test_encoders_convert_and_match_torch(tiny_model_factory, tmp_path, kind):
    manifest = export_bundle(
        tiny_model_factory(kind),
        tmp_path / kind,
        fast_export_options(formats=("tflite",), quants=("fp32", "int8"), profile=False),
    )
    entry = manifest.artifact("tflite-fp32")
    assert entry.parity["max_abs_diff"] <= 1e-4 and entry.parity["passed"]
    assert manifest.artifact("tflite-int8").parity["passed"]
    encoder = edgelm.load(tmp_path / kind, format="tflite-fp32")
    reference = edgelm.load(tmp_path / kind, format="reference-fp32")
    texts = ["first text", "a second, longer text " * 10]  # two padded lengths
    if kind == "bert":
        assert np.abs(encoder.embed(texts) - reference.embed(texts)).max() <= 1e-4
    else:
        assert [list(r) for r in encoder.classify(texts)] == [list(r) for r in reference.classify(texts)]


def test_truncated_or_foreign_files_are_invalid_not_a_crash(tflite_bundle, tmp_path):
    from edgelm.runtimes.litert import ADAPTER

    data = (tflite_bundle / "tflite" / "model_int8.tflite").read_bytes()
    for cut in (6, 64, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.tflite"
        bad.write_bytes(data[:cut])
        with pytest.raises(InvalidModelError):
            ADAPTER.open(bad)
    foreign = tmp_path / "foreign.tflite"
    foreign.write_bytes((tflite_bundle / "reference" / "model.safetensors").read_bytes()[:4096])
    with pytest.raises(InvalidModelError, match="not a TFLite model"):
        ADAPTER.open(foreign)


def test_inspect_lists_signatures_types_and_ops(tflite_bundle, tmp_path):
    from edgelm.inspect import describe

    title, rows = describe(tflite_bundle / "tflite" / "model_int8.tflite")
    info = dict(rows)
    assert title.startswith("tflite")
    assert info["signatures"].startswith("decode") and "prefill" in info["signatures"]
    assert "INT8" in info["weight types"] and "FULLY_CONNECTED" in info["operators"]
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(InvalidModelError):
        describe(bad)


def test_gpu_and_npu_are_refused_clearly_without_the_accelerator(tflite_bundle):
    """This machine has neither; where one exists the same call opens the model on it."""
    from edgelm.runtimes.litert import ADAPTER

    for device in ("gpu", "npu"):
        try:
            session = ADAPTER.open(tflite_bundle / "tflite" / "model.tflite", device=device)
        except DeviceError as err:
            assert device.upper() in str(err) and "cpu" in str(err)
        else:  # an accelerator is present: it must then run and agree with the CPU
            cpu = ADAPTER.open(tflite_bundle / "tflite" / "model.tflite")
            ids = np.arange(20)
            assert np.abs(session.prefill(ids) - cpu.prefill(ids)).max() <= 1e-2


def test_int4_is_refused_naming_the_recipes_it_has(tiny_llama, tmp_path):
    with pytest.raises(UnsupportedError, match="fp32, fp16, int8"):
        export_bundle(tiny_llama, tmp_path / "b", fast_export_options(formats=("tflite",), quants=("int4",)))
