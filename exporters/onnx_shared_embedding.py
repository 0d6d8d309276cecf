"""Tied embeddings in quantized ONNX: the input lookup reads the quantized output head.

After weight-only quantization, the output projection of a tied model is a MatMulNBits
over the (vocab × hidden) table, but the input lookup still Gathers from the float copy —
113 MB of fp32 on SmolLM2, half of the int4 file. onnxruntime's GatherBlockQuantized
(com.microsoft) reads the same MatMulNBits-layout bytes, scales and zero points, so the
float table can go: the lookup dequantizes just the rows it needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def share_quantized_embedding(model: Any, table_name: str) -> bool:
    """Rewire the Gather on `table_name` ([hidden, vocab], gathered on axis 1) to the
    quantized head. Returns True if the float table was removed. Modifies `model` in place."""
    from onnx import helper, numpy_helper

    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"{table_name}_Q8"), None)
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] == table_name), None)
    if head is None or gather is None or len(head.input) < 4:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    axis = next((helper.get_attribute_value(a) for a in gather.attribute if a.name == "axis"), 0)
    vocab, hidden, block = attrs["N"], attrs["K"], attrs["block_size"]
    if attrs["bits"] != 8 or axis != 1 or hidden % block:
        return False
    prefix = f"{table_name}_lookup"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([vocab, hidden], dtype=np.int64), f"{prefix}_data_shape"),
            numpy_helper.from_array(np.array([vocab, hidden // block], dtype=np.int64), f"{prefix}_block_shape"),
        ]
    )
    rows = f"{prefix}_rows"  # [n, hidden]
    replacement = [
        helper.make_node("Reshape", [head.input[1], f"{prefix}_data_shape"], [f"{prefix}_data"], name=f"{prefix}_data"),
        helper.make_node(
            "Reshape", [head.input[2], f"{prefix}_block_shape"], [f"{prefix}_scales"], name=f"{prefix}_scales"
        ),
        helper.make_node(
            "Reshape", [head.input[3], f"{prefix}_block_shape"], [f"{prefix}_zero_points"], name=f"{prefix}_zero_points"
        ),
        helper.make_node(
            "GatherBlockQuantized",
            [f"{prefix}_data", gather.input[1], f"{prefix}_scales", f"{prefix}_zero_points"],
            [rows],
            name=rows,
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=block,
            bits=8,
        ),
        # the graph expects Gather(table[hidden, vocab], axis=1) -> [hidden, n]
        helper.make_node("Transpose", [rows], [gather.output[0]], name=f"{prefix}_transposed", perm=[1, 0]),
    ]
    nodes = []
    for node in graph.node:
        nodes.extend(replacement if node is gather else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = any(table_name in n.input for n in graph.node)
    if not still_used:
        kept = [t for t in graph.initializer if t.name != table_name]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return not still_used
