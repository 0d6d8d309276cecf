"""GPTQ codes for onnxruntime's 4-bit MatMulNBits, on the grid its own quantizer chose.

onnxruntime's MatMulNBitsQuantizer rounds each weight to the nearest step of a per-block
grid (scale and integer zero point per block of 32 inputs). This keeps that grid — the
scales and zero points the quantizer wrote — and replaces only the packed 4-bit codes with
the ones edgelm.gptq picks from the layer's input Hessian on the calibration text. The
graph, the op and the file layout stay exactly what onnxruntime made.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelm.gptq import HessianAccumulator, gptq_codes, weight_fingerprint


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 bytes holding two 4-bit values each (low nibble first) → the first `count` values per row."""
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return values[:, :count]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[rows, 2m] values in 0..15 → [rows, m] bytes, low nibble first."""
    codes = codes.astype(np.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def apply_gptq(model: Any, original_weights: dict[str, np.ndarray], hessians: dict[str, HessianAccumulator],
               fingerprints: dict[str, str]) -> set[str]:
    """Re-pick the codes of every 4-bit MatMulNBits whose float weight has a Hessian.

    `original_weights`: the fp32 MatMul weights ([K, N]) by initializer name, read before
    quantization; `fingerprints`: weight_fingerprint → module name of the torch model the
    graph was exported from; `hessians`: module name → its inputs' accumulator. Returns the
    float weight names whose nodes got GPTQ codes. Modifies `model` in place.
    """
    import torch
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        source_name = node.input[1].removesuffix("_Q4")
        weight = original_weights.get(source_name)
        if attrs.get("bits") != 4 or len(node.input) < 4 or weight is None or k % block or block % 2:
            continue
        module = fingerprints.get(weight_fingerprint(weight))
        if module is None or module not in hessians:
            continue
        blocks = k // block
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
        zero_points = unpack_nibbles(numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1), blocks)
        codes = gptq_codes(torch.from_numpy(np.ascontiguousarray(weight.T)), hessians[module].hessian(),
                           torch.from_numpy(scales.astype(np.float32)), torch.from_numpy(zero_points.astype(np.float32)),
                           block).numpy()
        packed = pack_nibbles(codes).reshape(n, blocks, block // 2)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(packed, node.input[1]))
        done.add(source_name)
    return done
