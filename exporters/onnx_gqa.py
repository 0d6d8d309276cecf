"""onnxruntime's GroupQueryAttention (com.microsoft) in edgelm's ONNX decoder graph.

onnxruntime-genai's fast decoders (its model builder's) attend with GroupQueryAttention over a
KV buffer that past and present share: the runtime allocates each layer's cache once at the
model's max length and the node writes the new positions into it, instead of a graph
concatenating past and new into a fresh present every step. edgelm's graph does the same
(edgelm.decoder_graph.GroupQueryCache, which calls the torch op
`torch.ops.edgelm.group_query_attention` defined there, eagerly past + new concatenated); this
module translates that op to the ONNX node for torch.onnx's dynamo exporter. The same file runs
with a growing past (edgelm's own session: present = past + new) and with the shared buffer
(onnxruntime-genai, `past_present_share_buffer`).

The node reads where to write and how far to attend from the attention mask, as the
builder's graphs do: seqlens_k = sum(mask) - 1 per row, total_sequence_length = mask width.
Where the model's RoPE is full-width rotate-half (Llama, Qwen2, Gemma3's per-layer-type
tables), the node rotates q and k itself (do_rotary, with cos/sin tables of every position as
initializers, as the builder's graphs do): a dozen fewer nodes per layer and step. Partial
rotary (Phi-3's partial_rotary_factor) stays in edgelm's graph. Sliding-window layers pass their
window as local_window_size (measured equal to transformers' sliding-window masks on Gemma3 and
Phi-3).
"""

from __future__ import annotations

from typing import Any

import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op

DOMAIN = "com.microsoft"


def _schema() -> OpSchema:
    """The node's signature as onnxruntime's contrib ops define it (onnx itself does not know it)."""
    parameter, attribute = OpSchema.FormalParameter, OpSchema.Attribute
    names = ("query", "key", "value", "past_key", "past_value")
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        "GroupQueryAttention",
        DOMAIN,
        1,
        inputs=[
            *(parameter(name, "T") for name in names),
            parameter("seqlens_k", "M"),
            parameter("total_sequence_length", "M"),
            parameter("cos_cache", "T", param_option=optional),
            parameter("sin_cache", "T", param_option=optional),
        ],
        outputs=[parameter("output", "T"), parameter("present_key", "T"), parameter("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[
            attribute("num_heads", OpSchema.AttrType.INT, ""),
            attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
            attribute("scale", OpSchema.AttrType.FLOAT, ""),
            attribute("local_window_size", OpSchema.AttrType.INT, ""),
            attribute("do_rotary", OpSchema.AttrType.INT, ""),
            attribute("rotary_interleaved", OpSchema.AttrType.INT, ""),
        ],
    )


GROUP_QUERY_ATTENTION = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "GroupQueryAttention", _schema())


def group_query_attention_onnx(
    query,
    key,
    value,
    past_key,
    past_value,
    attention_mask,
    num_heads: int,
    kv_heads: int,
    scale: float,
    window: int,
    cos_cache=None,
    sin_cache=None,
):
    """The ONNX translation: the mask gives seqlens_k and the total length, as in the builder's graphs."""
    seqlens = op.Cast(op.Sub(op.ReduceSum(attention_mask, op.Constant(value_ints=[1])), op.Constant(value_int=1)), to=6)
    total = op.Cast(op.Gather(op.Shape(attention_mask), op.Constant(value_int=1)), to=6)
    rotary = cos_cache is not None
    return GROUP_QUERY_ATTENTION(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens,
        total,
        cos_cache,
        sin_cache,
        num_heads=num_heads,
        kv_num_heads=kv_heads,
        scale=scale,
        local_window_size=window if window > 0 else -1,
        do_rotary=int(rotary),
        rotary_interleaved=0,
    )


def translation_table() -> dict[Any, Any]:
    """For torch.onnx.export(custom_translation_table=...)."""
    return {torch.ops.edgelm.group_query_attention.default: group_query_attention_onnx}
