"""ONNX: the shared decoder graph exported, quantized, loaded in onnxruntime, checked for parity."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fast_export_options

import edgelm
from edgelm.errors import DeviceError, InvalidModelError, UnsupportedError
from edgelm.export import export_bundle

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


@pytest.fixture(scope="module")
def onnx_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "bundle"
    export_bundle(tiny_llama, out, fast_export_options(formats=("onnx",), quants=("fp32", "fp16", "int8", "int4")))
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "phi3", "llama-h16", "gemma3-h16"])
def test_graph_matches_transformers_with_and_without_cache(tiny_model_factory, kind):
    import torch
    import transformers

    from edgelm.graph import build_decoder_graph

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(kind)), dtype=torch.float32).eval()
    graph = build_decoder_graph(model)
    sig = graph.signature
    # 40 tokens: longer than the tiny Gemma3's and Phi-3's sliding windows (16), so the window mask matters
    ids = torch.randint(0, sig.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    empty = [torch.zeros(1, sig.num_kv_heads, 0, sig.head_dim) for _ in range(2 * sig.num_layers)]
    with torch.no_grad():
        reference = model(ids).logits
        first = graph(ids[:, :30], torch.ones((1, 30), dtype=torch.long), *empty)
        second = graph(ids[:, 30:], torch.ones((1, 40), dtype=torch.long), *first[1:])
    assert (first[0] - reference[:, :30]).abs().max() <= 1e-4
    assert (second[0] - reference[:, 30:]).abs().max() <= 1e-4
    # full-width rotate-half RoPE on 16-wide heads is left to the attention node (do_rotary); Phi-3's
    # partial RoPE and 8-wide heads keep it in the graph
    assert graph.cache.rotates_inside == kind.endswith("-h16")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "phi3", "llama-h16", "gemma3-h16"])
def test_onnx_fp32_matches_torch_within_1e_4(tiny_model_factory, tmp_path, kind):
    manifest = export_bundle(
        tiny_model_factory(kind),
        tmp_path / kind,
        fast_export_options(formats=("onnx",), quants=("fp32",), profile=False),
    )
    onnx_entry = manifest.artifact("onnx")
    assert onnx_entry.parity["max_abs_logit_diff_first_window"] <= 1e-4
    assert onnx_entry.parity["greedy_match_tokens"] == 64
    # every RMSNorm is onnxruntime's fused op (the first layer's input norm has no residual add before it)
    fused = onnx_entry.signature["fused_ops"]
    layers = 2  # tiny_models' configs
    assert fused["GroupQueryAttention"] == layers
    import onnx

    proto = onnx.load(str(tmp_path / kind / onnx_entry.path), load_external_data=False)
    rotary = [
        next((a.i for a in node.attribute if a.name == "do_rotary"), 0)
        for node in proto.graph.node
        if node.op_type == "GroupQueryAttention"
    ]
    assert rotary == [int(kind.endswith("-h16"))] * layers  # RoPE inside the node where it can be
    assert fused.get("SimplifiedLayerNormalization", 0) + fused.get("SkipSimplifiedLayerNormalization", 0) >= 2 * layers


def test_every_quant_recipe_loads_and_passes_its_gate(onnx_bundle):
    from edgelm.bundle import read_bundle

    manifest = read_bundle(onnx_bundle)
    by_quant = {a.quant: a for a in manifest.artifacts if a.format == "onnx"}
    assert set(by_quant) == {"fp32", "fp16", "int8", "int4"}
    for quant, entry in by_quant.items():
        assert entry.parity["passed"], (quant, entry.parity)
        assert entry.runtime == "onnxruntime"
        assert entry.signature["quantization"]
    assert by_quant["int4"].signature["quantization"]["op"] == "MatMulNBits"
    assert by_quant["int8"].signature["quantization"]["bits"] == 8
    assert not (onnx_bundle / "onnx" / ".fp32-source.onnx").exists()
    import onnx

    from edgelm.exporters.onnx_block_bias import branch_node_names

    for quant in ("int8", "int4"):  # the tied table is stored once: the lookup reads the head's bytes
        recipe = by_quant[quant].signature["quantization"]
        assert recipe["embedding_lookup"].startswith("GatherBlockQuantized") and recipe["fused_projections"] == 2 * 2
        proto = onnx.load(str(onnx_bundle / by_quant[quant].path))
        head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output)
        head_bytes = next(t for t in proto.graph.initializer if t.name == head.input[1]).raw_data
        assert sum(t.raw_data == head_bytes for t in proto.graph.initializer) == 1
        # every node named, and uniquely: a profile of a step (benchmarks/decode_profile.py) attributes by name
        names = [node.name for node in proto.graph.node]
        assert all(names) and len(set(names)) == len(names), [n.op_type for n in proto.graph.node if not n.name]
        assert len(branch_node_names(names)) == 4 * recipe.get("block_bias_correction", 0)
        read = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
        norms = [n for n in proto.graph.node if n.op_type.endswith("SimplifiedLayerNormalization")]
        assert norms and all(not name or name in read for n in norms for name in n.output[1:])  # no unread outputs


def test_onnx_session_decode_matches_prefill(onnx_bundle):
    session = edgelm.load(onnx_bundle, format="onnx-fp32").session()
    ids = np.array([3, 44, 120, 9, 200, 17], dtype=np.int64)
    session.reset()
    full = session.prefill(ids)
    session.reset()
    session.prefill(ids[:4])
    assert np.abs(session.decode(int(ids[4])) - full[4]).max() < 1e-4
    assert np.abs(session.decode(int(ids[5])) - full[5]).max() < 1e-4


def test_onnx_and_reference_generate_the_same_greedy_text(onnx_bundle):
    ref = edgelm.load(onnx_bundle, format="reference-fp32").generate("The object", max_new_tokens=16, ignore_eos=True)
    onnx = edgelm.load(onnx_bundle, format="onnx-fp32").generate("The object", max_new_tokens=16, ignore_eos=True)
    assert ref == onnx


def test_npu_without_a_provider_lists_what_is_available(onnx_bundle):
    with pytest.raises(DeviceError, match="available"):
        edgelm.load(onnx_bundle, format="onnx-fp32", device="npu")


def test_external_data_outside_the_model_folder_is_refused(onnx_bundle, tmp_path):
    import onnx

    from edgelm.runtimes.onnxruntime import ADAPTER

    folder = tmp_path / "model"
    folder.mkdir()
    proto = onnx.load(str(onnx_bundle / "onnx" / "fp32" / "model.onnx"))
    onnx.save(
        proto,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.data",
        size_threshold=0,
    )
    (folder / "weights.data").rename(tmp_path / "outside.data")
    # onnx.save itself refuses "..", so point the locations outside by editing the proto, as an attacker would
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    (folder / "model.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        ADAPTER.open(folder / "model.onnx")


def test_garbage_onnx_file_is_invalid(tmp_path):
    from edgelm.runtimes.onnxruntime import ADAPTER

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(InvalidModelError):
        ADAPTER.open(bad)


def test_a_family_outside_the_graph_is_refused_with_the_covered_list(tiny_llama):
    import torch
    import transformers

    from edgelm.graph import build_decoder_graph

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model.config.model_type = "bert"  # known to intake (an encoder), not a decoder the graph covers
    with pytest.raises(UnsupportedError, match="llama, qwen2, gemma3_text, phi3"):
        build_decoder_graph(model)


def test_a_model_over_the_protobuf_limit_is_written_with_external_data_inside_the_bundle(
    tiny_llama, tmp_path, monkeypatch
):
    """Lowering the threshold makes the tiny model take the >2 GB path: weights in model.onnx.data."""
    import edgelm.exporters.onnx as onnx_exporter
    from edgelm.bundle import read_bundle

    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "big"
    export_bundle(tiny_llama, out, fast_export_options(formats=("onnx",), quants=("fp32", "int4"), profile=False))
    manifest = read_bundle(out)  # verifies the sha256 of every file, the .data files included
    for name in ("fp32/model.onnx", "int4/model_q4.onnx"):
        entry = next(a for a in manifest.artifacts if a.path == f"onnx/{name}")
        data = out / "onnx" / f"{name}.data"
        assert data.is_file() and f"onnx/{name}.data" in manifest.files
        assert entry.signature["quantization"]["external_data"] is True
        assert entry.bytes == (out / entry.path).stat().st_size + data.stat().st_size
        assert entry.parity["passed"]
    onnx_files = sorted(p.relative_to(out / "onnx").as_posix() for p in (out / "onnx").rglob("*.onnx*"))
    assert onnx_files == ["fp32/model.onnx", "fp32/model.onnx.data", "int4/model_q4.onnx", "int4/model_q4.onnx.data"]
    lm = edgelm.load(out, format="onnx-int4")
    assert lm.generate("The object", max_new_tokens=4, ignore_eos=True)
