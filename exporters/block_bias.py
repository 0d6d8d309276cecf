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
