"""Per-block bias correction for 4-bit MatMulNBits: float zero points at integer-zp speed.

onnxruntime's 4-bit MatMulNBits stores w = scale * (q - zp) with an *integer* zero point.
When the real block offset is not a multiple of the scale (always, for weights that came
from llama.cpp's Q4_1/Q4_K, whose block minimum is a float), every weight of a block is
shifted by the same amount δ. Those shifts don't average out: they are a systematic bias,
and on SmolLM2 they cost 22% perplexity. Rounding noise alone costs far less.

The fix keeps the fast integer kernel and adds the missing term exactly:

    x · W  =  x · Wq  +  Σ_blocks (Σ_{k∈block} x_k) · δ[block, n]

i.e. one ReduceSum over each block of 32 inputs and a small MatMul with Δ[K/32, N] — 1/32
of the layer's multiply-adds. δ is the least-squares per-block correction: the mean
residual of the block (exact for weights that lie on a float-offset 4-bit grid).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import numpy as np

# what the correction branch of a node named N adds: N_blocks (Reshape), N_block_sums (ReduceSum),
# N_bias (MatMul with Δ), N_corrected (Add); a profile of a step finds the branches by these names
BRANCH_NODE_SUFFIXES = ("_blocks", "_block_sums", "_bias", "_corrected")


def branch_node_names(node_names: Iterable[str]) -> set[str]:
    """The names, among `node_names`, of the correction branches' nodes (each branch is found by
    its final Add, N_corrected, so that another node whose name merely ends the same way is not)."""
    names = set(node_names)
    prefixes = [name.removesuffix("_corrected") for name in names if name.endswith("_corrected")]
    return {prefix + suffix for prefix in prefixes for suffix in BRANCH_NODE_SUFFIXES} & names


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[rows, 2m] values in 0..15 → [rows, m] bytes, low nibble first."""
    codes = codes.astype(np.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 bytes holding two 4-bit values each (low nibble first) → the first `count` values per row."""
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return values[:, :count]


def dequantize_matmul_nbits(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int, n: int, block_size: int
) -> np.ndarray:
    """Rebuild the [K, N] float weight a 4-bit MatMulNBits node computes with."""
    blocks = packed.shape[1]
    q = unpack_nibbles(packed.reshape(n, -1), blocks * block_size).reshape(n, blocks, block_size).astype(np.float32)
    zp = unpack_nibbles(zero_points.reshape(n, -1), blocks).astype(np.float32)
    weights = (q - zp[..., None]) * scales.reshape(n, blocks, 1)
    return weights.reshape(n, blocks * block_size)[:, :k].T


def _branch(prefix: str, x: str, int4_output: str, result: str) -> list[Any]:
    """result = int4_output + (block sums of x) · Δ: Reshape, ReduceSum, MatMul, Add, each named
    after the corrected node (BRANCH_NODE_SUFFIXES), so that a profile of a step attributes them."""
    from onnx import helper

    blocks, sums, bias = f"{prefix}_blocks", f"{prefix}_block_sums", f"{prefix}_bias"
    return [
        helper.make_node("Reshape", [x, f"{prefix}_block_shape"], [blocks], name=blocks),
        helper.make_node("ReduceSum", [blocks, f"{prefix}_block_axis"], [sums], name=sums, keepdims=0),
        helper.make_node("MatMul", [sums, f"{prefix}_block_delta"], [bias], name=bias),
        helper.make_node("Add", [int4_output, bias], [result], name=f"{prefix}_corrected"),
    ]


def add_block_bias_correction(
    model: Any, original_weights: Mapping[str, np.ndarray], skip: Collection[str] = ()
) -> int:
    """Add the correction branch to every 4-bit MatMulNBits whose fp32 weight is known.

    `original_weights` maps the fp32 MatMul weight names (before quantization) to [K, N]
    arrays; weights named in `skip` are left as they are (GPTQ re-coded them). Returns how many
    nodes were corrected. Modifies `model` in place.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    corrected, new_nodes = 0, []
    for node in graph.node:
        new_nodes.append(node)
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits") != 4 or len(node.input) < 4:
            continue
        source_name = node.input[1].removesuffix("_Q4")
        if source_name not in original_weights or source_name in skip:
            continue
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        if k % block:
            continue
        dequantized = dequantize_matmul_nbits(
            numpy_helper.to_array(inits[node.input[1]]),
            numpy_helper.to_array(inits[node.input[2]]),
            numpy_helper.to_array(inits[node.input[3]]),
            k,
            n,
            block,
        )
        # contiguous [K, N] like the graph's own copy (a transposed view sums in another order)
        residual = np.ascontiguousarray(original_weights[source_name], dtype=np.float32) - dequantized
        delta = residual.reshape(k // block, block, n).mean(axis=1)  # [K/block, N]
        prefix = node.name or node.output[0]
        graph.initializer.extend(
            [
                numpy_helper.from_array(delta.astype(np.float32), f"{prefix}_block_delta"),
                numpy_helper.from_array(np.array([0, 0, k // block, block], dtype=np.int64), f"{prefix}_block_shape"),
                numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{prefix}_block_axis"),
            ]
        )
        result = node.output[0]
        node.output[0] = f"{result}_int4"
        new_nodes += _branch(prefix, node.input[0], node.output[0], result)
        corrected += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return corrected
