"""One export-friendly decoder graph, shared by the graph formats (ONNX, ExecuTorch, LiteRT).

Three cache layouts, one module. With an explicit cache (ONNX) the step is

    (input_ids[1, n], attention_mask[1, past_len + n], past_key_0, past_value_0, ...)
        -> (logits[1, n, vocab], present_key_0, ...)

with `past_*` of shape [1, kv_heads, past_len, head_dim] and `present_*` = past + the n new
positions, attended through onnxruntime's GroupQueryAttention, which also runs with one buffer
shared by past and present (onnxruntime-genai). With a static cache (ExecuTorch) the cache
lives in mutable buffers of a fixed `max_context` and the step is

    (input_ids[1, n], input_pos[1]) -> logits[1, n, vocab]

writing the n new keys/values at input_pos.. in place, so a decode step moves no cache
across the runtime boundary. LiteRT has no mutable state a signature could update, so its
layout (LiteRT-LM's convention) takes every layer's whole cache and gives it back updated
under the same name:

    (tokens[1, n], input_pos[n], kv_cache_k_0[1, kv_heads, max_context, head_dim], ...)
        -> (logits[1, n, vocab], kv_cache_k_0 (updated), ...)

and the runtime binds each output to its input's buffer, so the dynamic-update-slice inside
writes only the n new positions. In every layout positions and the causal mask are
computed inside the graph, and one graph serves prefill (n tokens) and decode (n = 1), free of Python
control flow on data. The wrapper reuses the source model's own modules (projections,
norms, MLP, rotary embedding, so RoPE scaling variants come for free) and writes only the
attention with its cache.

This module is torch-free (signatures, the covered families); the torch modules — the graph
and one object per cache layout — are in edgelm.decoder_graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgelm.architectures import head_dim
from edgelm.errors import UnsupportedError

# model_type -> family. The graph reads each model's variations off its own modules
# (q/k norms, sandwich norms, per-layer-type RoPE, sliding windows, embedding scale, logit
# softcapping), so a family joins by adding a row once its tests match transformers.
GRAPH_DECODERS = {"llama": "Llama", "qwen2": "Qwen2", "gemma3_text": "Gemma3", "phi3": "Phi-3"}


@dataclass(frozen=True)
class DecoderSignature:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int

    def past_names(self) -> list[str]:
        return [f"past_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [
                "input_ids[1,n] int64",
                "attention_mask[1,past_len+n] int64",
                "past_{key,value}_i[1,kv_heads,past_len,head_dim] float32",
            ],
            "outputs": ["logits[1,n,vocab] float32", "present_{key,value}_i[1,kv_heads,past_len+n,head_dim]"],
            "kv_cache": "explicit inputs/outputs through GroupQueryAttention: grows by n per call, or one buffer "
            "shared by past and present (onnxruntime-genai's past_present_share_buffer)",
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_context": self.max_context,
        }


def decoder_signature(config: Any) -> DecoderSignature:
    heads = config.num_attention_heads
    return DecoderSignature(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim(config),
        vocab_size=config.vocab_size,
        max_context=int(getattr(config, "max_position_embeddings", 2048)),
    )


def build_decoder_graph(
    model: Any,
    static_context: int | None = None,
    separate_head: bool = False,
    in_place_context: int | None = None,
    executorch_ops: bool = False,
) -> Any:
    """Wrap a transformers causal LM as a DecoderGraph; UnsupportedError if its family isn't covered.

    By default an explicit cache (ONNX); static_context=N: a static cache of N positions in
    mutable buffers, stepped by input_pos (ExecuTorch; executorch_ops=True through its llama
    custom ops, float32 activations); in_place_context=N: the whole cache of N positions in and
    out under the same names, LiteRT-LM's convention (LiteRT). separate_head=True keeps the
    model's own Embedding and output Linear even when they are tied.
    """
    model_type = model.config.model_type
    if model_type not in GRAPH_DECODERS:
        raise UnsupportedError(
            f"the exportable decoder graph covers {', '.join(GRAPH_DECODERS)}; {model_type!r} is not covered yet"
        )
    from edgelm.decoder_graph import DecoderGraph, ExecuTorchOpsCache, GroupQueryCache, InPlaceCache, StaticCache

    if in_place_context is not None:
        cache: Any = InPlaceCache(in_place_context)
    elif static_context is not None:
        cache = ExecuTorchOpsCache(static_context) if executorch_ops else StaticCache(static_context)
    else:
        cache = GroupQueryCache()
    return DecoderGraph(model, cache, separate_head).eval()


def example_inputs(signature: DecoderSignature, n: int = 3, past_len: int = 2) -> tuple[Any, ...]:
    """Inputs to trace with: n new tokens after past_len cached ones (both kept > 1 so that
    torch.export treats them as dynamic rather than specialising on 0/1), and the attention mask."""
    import torch

    ids = torch.zeros((1, n), dtype=torch.long)
    mask = torch.ones((1, past_len + n), dtype=torch.long)
    shape = (1, signature.num_kv_heads, past_len, signature.head_dim)
    return (ids, mask, *[torch.zeros(shape) for _ in range(2 * signature.num_layers)])
