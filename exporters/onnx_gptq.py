"""GPTQ codes for onnxruntime's 4-bit MatMulNBits, on the grid its own quantizer chose.

onnxruntime's MatMulNBitsQuantizer rounds each weight to the nearest step of a per-block
grid (scale and integer zero point per block of 32 inputs). This keeps that grid — the
scales and zero points the quantizer wrote — and replaces only the packed 4-bit codes with
the ones edgelm.gptq picks from the layer's input Hessian on the calibration text. The
graph, the op and the file layout stay exactly what onnxruntime made.

Per layer, GPTQ's codes are kept only when they beat the other recipe, round-to-nearest with
the block-bias correction (exporters/onnx_block_bias.py), on the layer's output error over the
calibration text, tr((W − Q) H (W − Q)ᵀ). Weights already on a float-offset 4-bit grid (the
default model's) are reproduced exactly by the block bias and keep it; off-grid weights mostly
take GPTQ's codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from edgelm.exporters.onnx_block_bias import dequantize_matmul_nbits, unpack_nibbles

from edgelm.gptq import HessianAccumulator, gptq_codes, weight_fingerprint


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
        zero_point_bytes = numpy_helper.to_array(inits[node.input[3]])
        zero_points = unpack_nibbles(zero_point_bytes.reshape(n, -1), blocks)
        hessian = hessians[module].hessian().to(torch.float64)
        float_weight = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float64))  # [N, K]
        codes = gptq_codes(float_weight, hessians[module], torch.from_numpy(scales.astype(np.float32)),
                           torch.from_numpy(zero_points.astype(np.float32)), block).numpy()
        gptq = (codes - np.repeat(zero_points, block, axis=1)) * np.repeat(scales, block, axis=1)
        rounded = dequantize_matmul_nbits(numpy_helper.to_array(inits[node.input[1]]), scales, zero_point_bytes,
                                          k, n, block).T.astype(np.float64)
        residual = float_weight.numpy() - rounded
        with_bias = rounded + np.repeat(residual.reshape(n, blocks, block).mean(-1), block, axis=1)
        if output_error(float_weight.numpy() - gptq, hessian) >= output_error(float_weight.numpy() - with_bias, hessian):
            continue  # round-to-nearest with the block bias does better on this layer
        packed = pack_nibbles(codes).reshape(n, blocks, block // 2)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(packed, node.input[1]))
        done.add(source_name)
    return done


def output_error(difference: np.ndarray, hessian: Any) -> float:
    """tr(E H Eᵀ) for a weight error E [out, in]: the layer's mean squared output error on the
    calibration inputs whose Σ xxᵀ / tokens is H."""
    import torch

    e = torch.from_numpy(np.ascontiguousarray(difference, dtype=np.float64))
    return float(((e @ hessian) * e).sum())
