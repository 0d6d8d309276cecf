"""Fused projections (edgelm.fusion): one matmul for q|k|v and one for gate|up, same function."""

from __future__ import annotations

import pytest

from edgelm.architectures import ARCHITECTURES


@pytest.mark.parametrize("layout", ["static", "in_place"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_a_fused_copy_computes_what_the_model_does_and_leaves_the_model_alone(tiny_model_factory, kind, layout):
    """Fused on a weight-sharing copy (as the ExecuTorch and TFLite exporters do): the decoder
    graph's logits in prefill and decode match the unfused model's (q|k rotated as one block
    there, apart here), and the model's own tensors are untouched."""
    import torch
    import transformers

    from edgelm.fusion import fuse_layer
    from edgelm.graph import build_decoder_graph
    from edgelm.model import copy_sharing_weights

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(kind)), dtype=torch.float32).eval()
    assert ARCHITECTURES[model.config.model_type].separate_projections
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    work = copy_sharing_weights(model)
    for layer in work.model.layers:
        fuse_layer(layer)
        assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")
    context = {f"{layout}_context": 64}
    fused_graph = build_decoder_graph(work, separate_head=True, **context)
    plain_graph = build_decoder_graph(model, separate_head=True, **context)
    sig = fused_graph.signature
    ids = torch.randint(0, sig.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for graph in (fused_graph, plain_graph):
            if layout == "static":
                graph.outputs = [graph(ids[:, :20], torch.tensor([0]))] + [
                    graph(ids[:, i : i + 1], torch.tensor([i])) for i in range(20, 24)
                ]
                continue
            shapes = graph.cache.cache_shapes(sig.num_kv_heads, 64, sig.head_dim)
            cache = [torch.zeros(shapes[kind]) for _ in range(sig.num_layers) for kind in ("k", "v")]
            graph.outputs = []
            for start, end in ((0, 20), *((i, i + 1) for i in range(20, 24))):
                logits, *cache = graph(ids[:, start:end], torch.arange(start, end), *cache)
                graph.outputs.append(logits)
    for fused, plain in zip(fused_graph.outputs, plain_graph.outputs, strict=True):
        assert (fused - plain).abs().max() <= 1e-5
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_each_fused_linear_is_named_after_a_part_that_reads_its_input(tiny_llama):
    """GPTQ's statistics are found by a Linear's source name; a fused Linear answers to the name of
    the first part it replaced (q_proj, gate_proj), whose input it reads."""
    import torch
    import transformers

    from edgelm.fusion import fuse_layer

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    layer = model.model.layers[0]
    q_proj, gate_proj, k_proj = layer.self_attn.q_proj, layer.mlp.gate_proj, layer.self_attn.k_proj
    replaced = fuse_layer(layer)
    assert list(replaced.values()) == [q_proj, gate_proj]
    qkv = layer.self_attn.qkv_proj
    assert qkv.weight.shape[0] == q_proj.out_features + 2 * k_proj.out_features
    assert torch.equal(qkv.weight[: q_proj.out_features], q_proj.weight)
