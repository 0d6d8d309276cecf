"""TFLite int4: every transformer Linear on a 4-bit grid with a float offset per block of 32,
stored as LiteRT's blockwise int4 (dynamic int8 activations: XNNPACK's qd8-f32-qb4w kernels).

ai-edge-quantizer's own blockwise int4 is symmetric round-to-nearest (ppl ratio 1.50 on
SmolLM2 in the peer baselines). So edgelm chooses the grid and the codes itself and hands the
quantizer weights that already sit on it; its `dequantized_weight_recovery` algorithm reads
the scales and codes back exactly. The grid is asymmetric through the block-bias correction
(exporters/block_bias.py, as in ExecuTorch's int4): symmetric codes k ∈ −8..7 with scale s,
plus an offset per block in a small float Linear. Calibrated attempts pick the codes by GPTQ on
a searched grid (edgelm.gptq) where that errs less on the calibration inputs than
round-to-nearest on the min/max grid, and every block's offset is fitted to those inputs
(least squares of the layer's output error, given the codes).

Two constraints of the stored form shape the grid: LiteRT keeps block scales as float16
(rounded through bfloat16), so every scale is a bfloat16 value at or above float16's smallest
normal; and the quantizer recovers a block's scale as the least gap between its distinct
|values| and 0, so every block holds two |codes| one apart (true of all but degenerate
blocks; those are nudged by one code and counted).
"""

from __future__ import annotations

from typing import Any

import torch

from edgelm.exporters.block_bias import GROUP_SIZE, BlockBiasCorrected, best_fitted, replace_module, spread
from edgelm.model import linears_but_the_head

MIN_SCALE = 2.0**-14  # float16's smallest normal
INNER, CORRECTION = "linear", "correction"  # BlockBiasCorrected's submodules: the quantizer tells them apart by name


def storable(scale: Any) -> Any:
    """The scale as LiteRT will store it (bfloat16 → float16), so dequantized weights are exact."""
    return scale.clamp(min=MIN_SCALE).to(torch.bfloat16).to(torch.float32)


def nearest_codes(weight: Any) -> tuple[Any, Any, Any]:
    """Round-to-nearest on each block's min/max: (codes k ∈ −8..7, scale, offset), offset = low + 8s."""
    blocks = weight.to(torch.float32).unflatten(-1, (-1, GROUP_SIZE))
    low, high = blocks.amin(-1), blocks.amax(-1)
    scale = storable((high - low) / 15)
    offset = low + 8 * scale
    codes = torch.clamp(torch.round((blocks - offset[..., None]) / scale[..., None]), -8, 7).flatten(-2)
    return codes, scale, offset


def gptq_codes_on_searched_grid(weight: Any, inputs: Any, hessian: Any) -> tuple[Any, Any, Any]:
    """GPTQ's codes on edgelm.gptq's searched grid, in the same (codes, scale, offset) form.
    `hessian`: inputs.hessian(), read once by the caller."""
    from edgelm.gptq import gptq_codes, searched_grid

    scale, zero = searched_grid(weight, torch.diag(hessian), GROUP_SIZE)
    scale = storable(scale)
    codes = gptq_codes(weight, inputs, scale, zero, GROUP_SIZE, hessian=hessian)
    return (codes - 8).to(torch.float32), scale, scale * (8 - zero)


def recoverable(codes: Any) -> tuple[Any, int]:
    """`codes` with every block made readable by the quantizer's scale recovery (two |codes|
    one apart, 0 counted): a block without is nudged, its smallest nonzero |code| set to 1
    (an all-zero block: its first code). Returns (codes, blocks nudged)."""
    blocks = codes.unflatten(-1, (-1, GROUP_SIZE)).abs().to(torch.long)
    present = torch.zeros((*blocks.shape[:-1], 9), dtype=torch.bool)
    present.scatter_(-1, blocks, True)
    present[..., 0] = True
    bad = ~(present[..., :-1] & present[..., 1:]).any(-1)
    count = int(bad.sum())
    if count == 0:
        return codes, 0
    fixed = codes.clone().unflatten(-1, (-1, GROUP_SIZE))
    for row, block in bad.nonzero().tolist():
        values = fixed[row, block]
        magnitude = torch.where(values == 0, torch.full_like(values, 99), values.abs())
        at = int(magnitude.argmin())
        values[at] = 1 if values[at] >= 0 else -1
    return fixed.flatten(-2), count


def _layer_codes(weight: Any, inputs: Any | None) -> tuple[Any, Any, Any, bool]:
    """(codes, scale, offset, took GPTQ's) for one layer. With the layer's calibration inputs:
    GPTQ on the searched grid or round-to-nearest on min/max, whichever errs less, each with
    its offsets fitted to those inputs (block_bias.fitted_offsets); without, round-to-nearest."""
    nearest = nearest_codes(weight)
    if inputs is None:
        return (*nearest, False)
    hessian = inputs.hessian()  # a stored sum: read from its file once for the layer
    candidates = (nearest, gptq_codes_on_searched_grid(weight, inputs, hessian))
    choice, offset = best_fitted(weight, hessian, [(c * spread(s), o) for c, s, o in candidates])
    codes, scale, _ = candidates[choice]
    return codes, scale, offset, choice == 1


def to_block_grid(model: Any, hessians: dict[str, Any] | None = None) -> dict[str, Any]:
    """Put every Linear of `model` but the output head on its 4-bit grid, in place: the weight
    becomes the symmetric part (codes × scale, exact in float32) and the module a
    BlockBiasCorrected carrying the offsets. `hessians`: per Linear name, its inputs on the
    calibration text (GPTQ). Returns what was done, for the recipe."""
    targets = linears_but_the_head(model)
    gptq_layers = nudged = 0
    skipped: list[str] = []
    for name, module in targets:
        weight = module.weight.detach().to(torch.float32)
        if weight.shape[1] % GROUP_SIZE:  # stays as it is: stored int8 per channel like the head
            skipped.append(name)
            continue
        codes, scale, offset, took_gptq = _layer_codes(weight, (hessians or {}).get(name))
        codes, fixed = recoverable(codes)
        gptq_layers, nudged = gptq_layers + took_gptq, nudged + fixed
        dtype = module.weight.dtype
        module.weight = torch.nn.Parameter((codes * spread(scale)).to(dtype), requires_grad=False)
        replace_module(model, name, BlockBiasCorrected(module, offset.to(dtype)))
    described = {"layers": len(targets) - len(skipped), "gptq_layers": gptq_layers, "blocks_nudged": nudged}
    return described | ({"int8_layers": skipped} if skipped else {})
