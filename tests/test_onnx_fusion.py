"""exporters/onnx_fusion.py: q|k|v packed into GroupQueryAttention, other MatMuls of one input
concatenated, with the same outputs as the unfused graph."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def _run(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _decoder_feeds(model, tokens: int = 12) -> dict[str, np.ndarray]:
    """A prefill of `tokens` ids with an empty cache, every past input [1, kv_heads, 0, head_dim]."""
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "input_ids":
            feeds[value.name] = np.random.default_rng(0).integers(0, 50, (1, tokens), dtype=np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, tokens), dtype=np.int64)
        else:
            feeds[value.name] = np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)
    return feeds


@pytest.mark.parametrize("kind", ["llama-h16", "gemma3"])
def test_a_decoder_layer_keeps_four_matmuls_and_computes_the_same_logits(tiny_model_factory, tmp_path, kind):
    import onnx
    import torch
    import transformers

    from edgelm.exporters.onnx import export_decoder_onnx, layer_matmuls
    from edgelm.exporters.onnx_fusion import fuse_projections

    source = tiny_model_factory(kind)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    export_decoder_onnx(model, tmp_path / "fp32.onnx")
    unfused = onnx.load(str(tmp_path / "fp32.onnx"))
    fused = onnx.load(str(tmp_path / "fp32.onnx"))
    parts = fuse_projections(fused)
    layers = model.config.num_hidden_layers
    assert [len(layer_matmuls(fused, (i,))) for i in range(layers)] == [4] * layers  # q|k|v, o, gate|up, down
    assert sorted(len(names) for names in parts.values()) == [2] * layers + [3] * layers
    attention = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    # Llama's q/k/v reach the node through reshapes only: packed into it. Gemma3 norms q and k per
    # head first: its q|k|v is one MatMul and a Split, and the node reads three inputs
    packed = kind.startswith("llama")
    assert all((n.input[1] == n.input[2] == "") == packed for n in attention)
    assert sum(n.op_type == "Split" for n in fused.graph.node) == layers * (1 if packed else 2)
    feeds = _decoder_feeds(unfused)
    for before, after in zip(_run(unfused, feeds), _run(fused, feeds), strict=True):
        np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)


def test_an_encoders_qkv_share_one_matmul_and_keep_their_biases(tiny_model_factory, tmp_path):
    import onnx

    from edgelm.exporters.onnx import export_encoder_onnx
    from edgelm.exporters.onnx_fusion import fuse_projections
    from edgelm.model import inspect_source, load_reference_model

    source = inspect_source(str(tiny_model_factory("bert")))
    model = load_reference_model(source, tmp_path / "tokenizer")
    export_encoder_onnx(model, source.task, tmp_path / "fp32.onnx")
    unfused = onnx.load(str(tmp_path / "fp32.onnx"))
    fused = onnx.load(str(tmp_path / "fp32.onnx"))
    parts = fuse_projections(fused)
    assert sorted(len(names) for names in parts.values()) == [3] * model.config.num_hidden_layers
    ids = np.random.default_rng(1).integers(1, 50, (2, 9), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for before, after in zip(_run(unfused, feeds), _run(fused, feeds), strict=True):
        np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)


def test_fused_weights_are_their_parts_side_by_side_and_hide_the_parts():
    from edgelm.exporters.onnx_fusion import FusedWeights, fused_modules

    weights = {"q": np.ones((4, 2)), "k": np.zeros((4, 1)), "o": np.full((2, 4), 3.0)}
    fused = FusedWeights(weights, {"q_fused": ["q", "k"], "missing_fused": ["q", "nowhere"]})
    assert fused["q_fused"].shape == (4, 3) and fused["q_fused"][:, 2].sum() == 0
    assert set(fused) == {"o", "q_fused"} and "q" not in fused and "missing_fused" not in fused
    modules = fused_modules({"q": "layers.0.q_proj", "k": "layers.0.k_proj"}, {"q_fused": ["q", "k"]})
    assert modules["q_fused"] == "layers.0.q_proj"
