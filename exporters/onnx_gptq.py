"""GPTQ codes for onnxruntime's 4-bit MatMulNBits, in the layout its own quantizer writes.

onnxruntime's MatMulNBitsQuantizer rounds each weight to the nearest step of a per-block
min/max grid (scale and integer zero point per block of 32 inputs). For every layer with a
Hessian this searches each block's range by weighted error (edgelm.gptq.searched_grid),
picks the codes by GPTQ on that grid, and writes codes, scales and zero points back into the
quantizer's own initializers: the graph, the op and the file layout stay exactly what
onnxruntime made.

Per layer, GPTQ's result is kept only when it beats the other recipe, round-to-nearest on
onnxruntime's grid with the block-bias correction (exporters/onnx_block_bias.py), on the
layer's output error over the calibration text, tr((W − Q) H (W − Q)ᵀ). Weights already on a
float-offset 4-bit grid (the default model's) are reproduced exactly by the block bias and
keep it; off-grid weights mostly take GPTQ's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelm.exporters.onnx_block_bias import dequantize_matmul_nbits, pack_nibbles
from edgelm.gptq import (
    HessianAccumulator,
    gptq_codes,
    output_error,
    searched_grid,
)


def apply_gptq(
    model: Any,
    original_weights: dict[str, np.ndarray],
    hessians: dict[str, HessianAccumulator],
    modules: dict[str, str],
) -> set[str]:
    """Re-pick the grid and codes of every 4-bit MatMulNBits whose float weight has a Hessian.

    `original_weights`: the fp32 MatMul weights ([K, N]) by initializer name, read before
    quantization; `modules`: initializer name → the torch Linear it was exported from
    (exporters.onnx.source_weights); `hessians`: module name → its inputs' accumulator. Returns the
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
        module = modules.get(source_name)
        if module is None or module not in hessians:
            continue
        blocks = k // block
        ort_scales = numpy_helper.to_array(inits[node.input[2]])
        ort_zero_points = numpy_helper.to_array(inits[node.input[3]])
        hessian = hessians[module].hessian().to(torch.float64)
        float_weight = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float64))  # [N, K]
        scales, zero_points = searched_grid(float_weight, torch.diagonal(hessian), block)
        codes = gptq_codes(float_weight, hessians[module], scales, zero_points, block, hessian=hessian).numpy()
        scales, zero_points = scales.numpy(), zero_points.numpy().astype(np.uint8)
        gptq = (codes - np.repeat(zero_points, block, axis=1)) * np.repeat(scales, block, axis=1)
        rounded = dequantize_matmul_nbits(
            numpy_helper.to_array(inits[node.input[1]]), ort_scales.reshape(n, blocks), ort_zero_points, k, n, block
        ).T.astype(np.float64)
        residual = float_weight.numpy() - rounded
        with_bias = rounded + np.repeat(residual.reshape(n, blocks, block).mean(-1), block, axis=1)
        if output_error(float_weight.numpy() - gptq, hessian) >= output_error(
            float_weight.numpy() - with_bias, hessian
        ):
            continue  # round-to-nearest with the block bias (on onnxruntime's min/max grid) does better here
        packed = pack_nibbles(codes).reshape(n, blocks, block // 2)
        padded = np.pad(zero_points, ((0, 0), (0, blocks % 2)))  # two zero points per byte, rows padded to even
        for index, value in (
            (1, packed),
            (2, scales.astype(ort_scales.dtype).reshape(ort_scales.shape)),
            (3, pack_nibbles(padded).reshape(ort_zero_points.shape)),
        ):
            inits[node.input[index]].CopyFrom(numpy_helper.from_array(value, node.input[index]))
        done.add(source_name)
    return done
