"""4-bit weights with a float offset per block, for formats whose int4 kernels are symmetric.

Any asymmetric 4-bit grid w = s·(q − z), q ∈ 0..15, is symmetric int4 k = q − 8 with the same
scale s plus one float offset s·(8 − z) per block of GROUP_SIZE weights. The offsets come back
as one small float Linear over the sum of each block's inputs (1/GROUP_SIZE of the
multiply-adds): `BlockBiasCorrected`. ExecuTorch's 8da4w and LiteRT's blockwise int4 both
run the symmetric part; a block already on a 4-bit grid (a Q4_1 GGUF's) stays exact.

Imported only by exporters that need torch.
"""

from __future__ import annotations

from typing import Any

from torch import nn

GROUP_SIZE = 32


class BlockBiasCorrected(nn.Module):
    """`linear` (symmetric int4 weights, dequantized or quantized) + the per-block offsets
    [out, in / GROUP_SIZE] times the block sums of the input."""

    def __init__(self, linear: Any, block_offsets: Any) -> None:
        super().__init__()
        self.linear = linear
        self.correction = nn.Linear(block_offsets.shape[1], block_offsets.shape[0], bias=False)
        self.correction.weight = nn.Parameter(block_offsets.contiguous(), requires_grad=False)

    def forward(self, x: Any) -> Any:
        return self.linear(x) + self.correction(x.unflatten(-1, (-1, GROUP_SIZE)).sum(-1))


def replace_module(root: Any, name: str, module: Any) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attribute, module)


def spread(per_block: Any) -> Any:
    """[out, in / GROUP_SIZE] → [out, in]: each block's value over its columns."""
    return per_block.repeat_interleave(GROUP_SIZE, dim=1)


def fitted_offsets(weight: Any, symmetric: Any, hessian: Any, fallback: Any) -> Any:
    """The per-block offsets [out, in / GROUP_SIZE] that, added to the symmetric part
    `symmetric` (codes × scale, [out, in]), leave the least output error on the calibration
    inputs whose Σ xxᵀ / tokens is `hessian`: per output row, least squares of tr(E H Eᵀ) over
    one value per block, o = R H Bᵀ (B H Bᵀ)⁻¹ with R = W − symmetric and B the block indicator.

    Never worse on those inputs than any other offsets for the same codes (the grid's own
    s·(8 − z), or the mean residual); a weight already on a 4-bit grid gets its offsets back
    exactly. A block whose inputs were zero on every calibration token keeps its `fallback`
    offset (the calibration text says nothing about it). Simulated on the mild off-grid twin
    (TFLite's recipe): output error × 0.80 per layer, ppl ratio 1.0465 → 1.0351."""
    return _fitted(weight, symmetric, hessian, fallback)[0]


def _fitted(weight: Any, symmetric: Any, hessian: Any, fallback: Any) -> tuple[Any, float]:
    """fitted_offsets' offsets and the output error tr(E H Eᵀ) they leave.

    With R = W − symmetric and E = R − o Bᵀ, the error is tr(R H Rᵀ) − 2·Σ o ⊙ (R H B) +
    Σ (o BᵀHB) ⊙ o: one [out, in] × [in, in] product for R, then [out, blocks]-sized terms for
    any offsets (R H B is the least-squares right-hand side already). Computing tr(E H Eᵀ) anew
    for each offsets tried was three such products per candidate grid (float64, [out, in] ×
    [in, in]: the largest arithmetic of the ExecuTorch and TFLite int4 recipes' fitting)."""
    import torch

    from edgelm.gptq import output_error

    h = hessian.to(torch.float64)
    columns = h.shape[0]
    blocks = columns // GROUP_SIZE
    h_b = h.reshape(columns, blocks, GROUP_SIZE).sum(-1)  # H Bᵀ, [in, blocks]
    block_h = h_b.reshape(blocks, GROUP_SIZE, blocks).sum(1)  # B H Bᵀ, [blocks, blocks]
    unseen = torch.diagonal(block_h) <= 0
    damped = block_h + 1e-6 * max(float(torch.diagonal(block_h).mean()), 1e-30) * torch.eye(blocks, dtype=torch.float64)
    part = weight.to(torch.float64) - symmetric.to(torch.float64)
    residual = part @ h_b  # R H Bᵀ, [out, blocks]
    whole = output_error(part, h)

    def error(offsets: Any) -> float:
        return whole - 2 * float((offsets * residual).sum()) + float(((offsets @ block_h) * offsets).sum())

    fallback = fallback.to(torch.float64)
    fitted = torch.where(unseen[None, :], fallback, torch.linalg.solve(damped, residual.T).T)
    # the solve is damped: keep `fallback` where it is already as good (a weight on its grid)
    fitted_error, fallback_error = error(fitted), error(fallback)
    if fitted_error < fallback_error:
        return fitted.to(weight.dtype), fitted_error
    return fallback.to(weight.dtype), fallback_error


def best_fitted(weight: Any, hessian: Any, candidates: list[tuple[Any, Any]]) -> tuple[int, Any]:
    """Of `candidates` — (symmetric part, its grid's own offsets) for the same weight — the one
    whose fitted offsets leave the least output error on the calibration inputs (the first on a
    tie): (its index, those offsets)."""
    best: tuple[float, int, Any] | None = None
    for index, (symmetric, fallback) in enumerate(candidates):
        offsets, error = _fitted(weight, symmetric, hessian, fallback)
        if best is None or error < best[0]:
            best = (error, index, offsets)
    assert best is not None
    return best[1], best[2]
