"""TFLite / LiteRT: the in-place-cache decoder graph, .tflite export (litert-torch, ai-edge-quantizer
recipes), the LiteRT runtime, and files that are not (whole) TFLite models."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import fast_export_options

import edgelm
from edgelm.errors import DeviceError, InvalidModelError
from edgelm.export import export_bundle

DECODERS = ["llama", "qwen2", "gemma3", "phi3"]


@pytest.mark.parametrize("kind", DECODERS)
def test_in_place_cache_graph_matches_transformers_in_padded_chunks_with_garbage_past_the_position(
    tiny_model_factory, kind
):
    """The layout LiteRT runs (LiteRT-LM's): the whole cache in and out, chunks padded the way
    LiteRT-LM pads them (token 0 at position 0 after the real tokens). Slots past the position
    hold large garbage (a previous, longer sequence, or a chunk's padding) that must stay masked."""
    import torch
    import transformers

    from edgelm.graph import build_decoder_graph

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(kind)), dtype=torch.float32).eval()
    graph = build_decoder_graph(model, in_place_context=64)
    sig = graph.signature
    ids = torch.randint(0, sig.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    shapes = graph.cache.cache_shapes(sig.num_kv_heads, 64, sig.head_dim)
    cache = [torch.randn(shapes[kind]) * 100 for _ in range(sig.num_layers) for kind in ("k", "v")]
    outputs, pos = [], 0
    with torch.no_grad():
        reference = model(ids).logits
        for chunk in (ids[:, :16], ids[:, 16:17], ids[:, 17:30], *[ids[:, i : i + 1] for i in range(30, 40)]):
            n = chunk.shape[1]
            width = 16 if n > 1 else 1
            tokens = torch.zeros((1, width), dtype=torch.long)
            tokens[0, :n] = chunk[0]
            positions = torch.zeros((width,), dtype=torch.long)
            positions[:n] = torch.arange(pos, pos + n)
            logits, *cache = graph(tokens, positions, *cache)
            outputs.append(logits[:, :n])
            pos += n
    assert (torch.cat(outputs, dim=1) - reference).abs().max() <= 1e-4


pytest.importorskip("litert_torch", reason="the tflite extra is not installed")


@pytest.fixture(scope="module")
def tflite_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite") / "bundle"
    export_bundle(tiny_llama, out, fast_export_options(formats=("tflite",), quants=("fp32", "fp16", "int8", "int4")))
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
        "int4": "tflite/model_int4.tflite",
    }
    assert by_quant["int4"].signature["quantization"]["block_grid"]["layers"] == 2 * 7  # every Linear but the head
    assert by_quant["fp32"].parity["max_abs_logit_diff_first_window"] <= 1e-4
    for entry in by_quant.values():
        assert entry.parity["passed"], entry.parity
        assert entry.runtime == "litert" and entry.profile["decode_tok_s"] > 0
        assert entry.signature["max_context"] == 512 and entry.signature["prefill_length"] == 128
    # weights stored once for both signatures, so the quantized files really are smaller
    assert by_quant["int8"].bytes < by_quant["fp16"].bytes < by_quant["fp32"].bytes
    # q|k|v and gate|up are one FULLY_CONNECTED each (int4 keeps its parts: its grids are found by name)
    from edgelm.tflite_file import read_tflite

    layers, signatures = 2, 2
    for quant in ("fp32", "int8"):
        assert by_quant[quant].signature["quantization"]["fused_projections"].startswith("q|k|v")
        operators = read_tflite(tflite_bundle / by_quant[quant].path).operators
        assert operators["FULLY_CONNECTED"] == signatures * (layers * 4 + 1)  # and the head
    assert "fused_projections" not in by_quant["int4"].signature["quantization"]


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


def test_a_prefill_near_the_end_of_the_cache_keeps_every_position(tflite_bundle, tiny_llama):
    """A prefill chunk is padded to the signature's 128 tokens and written from input_pos on; where
    that would run past the cache's 512 positions (a dynamic-update-slice that does not fit is
    moved back onto earlier positions), the session steps through decode instead. The logits of
    a prompt that ends at the cache's last position match transformers'."""
    import torch
    import transformers

    from edgelm.runtimes.litert import ADAPTER

    session = ADAPTER.open(tflite_bundle / "tflite" / "model.tflite", threads=1)
    ids = np.random.default_rng(1).integers(0, 300, 512)
    logits = np.concatenate([session.prefill(ids[:400]), session.prefill(ids[400:])])  # 400 + 128 > 512
    session.close()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(logits - reference).max() <= 1e-4


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
    total = sum(int(count) for count in re.findall(r"×(\d+)", info["operators"]))
    assert 0 < int(info["decode operators"]) < int(info["prefill operators"]) <= total  # one subgraph each
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


def test_int4_weights_are_stored_as_int4_blocks_with_float_offsets(tflite_bundle):
    """The int4 file holds the 14 transformer Linears as INT4 tensors (float16 block scales)
    and their block offsets as float32; the tied embedding/head stays int8."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    model = tfl_flatbuffer_utils.read_model(str(tflite_bundle / "tflite" / "model_int4.tflite"))

    def constant(tensor) -> bool:
        buffer = model.buffers[tensor.buffer] if tensor.buffer else None
        return buffer is not None and ((buffer.data is not None and len(buffer.data) > 0) or bool(buffer.size))

    constants = [t for t in model.subgraphs[0].tensors if constant(t)]
    int4 = [t for t in constants if t.type == 17]  # TensorType.INT4
    assert len(int4) == 14 and all(tuple(t.shape)[1] % 32 == 0 for t in int4)
    # the offsets, [out, in / 32] (a single block folded by the converter to [out]), stay float32
    corrections = [t for t in constants if b"Linear_correction" in (t.name or b"")]
    assert len(corrections) == 14 and all(t.type == 0 for t in corrections)
    assert sum(t.type == 9 for t in constants) == 1  # INT8: the one tied [vocab, hidden] table


def test_the_quantizer_reads_edgelms_grid_back_exactly():
    """ai-edge-quantizer recovers each block's scale as the least gap between its |values| and
    0: on edgelm's grid (bfloat16 scales, every block readable) it gets the exact scales."""
    import torch
    from ai_edge_quantizer.algorithms.uniform_quantize import dequantized_weight_recovery as recovery

    from edgelm.exporters.block_bias import spread
    from edgelm.exporters.tflite_int4 import nearest_codes, recoverable

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.rand(1, 256) * 3
    codes, scale, _ = nearest_codes(weight)
    codes, _ = recoverable(codes)
    stored = (codes * spread(scale)).numpy()
    _, recovered = recovery.get_zp_scale_from_dequantized_symmetric_weights(stored, 1, 32)
    assert np.array_equal(recovered.astype(np.float16).astype(np.float32), scale.numpy())


def test_blocks_the_quantizer_could_not_read_are_nudged_by_one_code():
    import torch

    from edgelm.exporters.tflite_int4 import recoverable

    readable = torch.tensor([[3.0, -4.0] * 16])  # |3| and |4| are one apart
    evens = torch.tensor([[2.0, -4.0, 6.0, 0.0] * 8])  # least gap 2: the scale would read double
    zeros = torch.zeros(1, 32)  # least gap undefined: a zero scale XNNPACK refuses
    fixed, nudged = recoverable(torch.cat([readable, evens, zeros]))
    assert nudged == 2
    assert torch.equal(fixed[0], readable[0])
    assert (fixed[1] != evens[0]).sum() == 1 and fixed[1].abs().min() == 0 and (fixed[1].abs() == 1).sum() == 1
    assert fixed[2].abs().sum() == 1


def test_without_memory_for_a_fused_copy_the_projections_stay_apart(tiny_llama, tmp_path, monkeypatch):
    """The fused Linears are new tensors beside the caller's: where the memory available cannot
    hold them with the conversion, the export keeps the parts and says so."""
    import types

    import psutil
    import torch
    import transformers

    import edgelm.exporters.tflite as tflite
    from edgelm.background import MEMORY_HEADROOM
    from edgelm.tflite_file import read_tflite

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = tflite.FUSED_COPY_FACTOR * weights + MEMORY_HEADROOM
    for available, fits in ((needed - 1, False), (needed + 1, True)):
        memory = types.SimpleNamespace(available=available)
        monkeypatch.setattr(psutil, "virtual_memory", lambda memory=memory: memory)
        assert tflite.fits_a_fused_copy(model) == fits
    monkeypatch.undo()
    monkeypatch.setattr(tflite, "fits_a_fused_copy", lambda model: False)
    manifest = export_bundle(
        tiny_llama, tmp_path / "b", fast_export_options(formats=("tflite",), quants=("fp32",), profile=False)
    )
    entry = manifest.artifact("tflite-fp32")
    assert entry.signature["quantization"]["fused_projections"] == tflite.FUSION_SKIPPED
    assert entry.parity["passed"]
    layers, signatures = 2, 2
    assert read_tflite(tmp_path / "b" / entry.path).operators["FULLY_CONNECTED"] == signatures * (layers * 7 + 1)
