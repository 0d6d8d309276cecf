"""Fuse the Linears of one decoder layer that read the same input into one matmul each.

Llama, Qwen2 and Gemma3 checkpoints keep q/k/v and gate/up as separate Linears. Every one of
them becomes a pattern in a lowered graph: ExecuTorch's 8da4w turns each into an activation
quantization, a weight dequantization, a matmul and a block-bias correction; its XNNPACK
lowering costs time per node (seven patterns per layer, four once fused), and
each pattern quantizes the same activations again at run time. Fused, q|k|v is one Linear
that edgelm.decoder_graph splits (as it does Phi-3's own qkv_proj) and gate|up one that
FusedGatedMLP splits.

The fused weights are new tensors (the rows of the parts, concatenated), so a model that
shares its parts' storage with another (edgelm.model.copy_sharing_weights) leaves the other
untouched. Which architectures have separate projections is their row's
`separate_projections` (edgelm.architectures).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj")
MLP_PARTS = ("gate_proj", "up_proj")


class FusedGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate|up as one Linear: the MLP of Llama, Qwen2 and Gemma3."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Module, act_fn: Any) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(self, x: Any) -> Any:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def concatenated(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output rows are the parts' outputs, in order."""
    weight = torch.cat([part.weight.detach() for part in parts])
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([part.bias.detach() for part in parts]), requires_grad=False)
    return fused


def fuse_layer(layer: nn.Module) -> dict[nn.Module, nn.Module]:
    """Fuse `layer`'s q/k/v into self_attn.qkv_proj and its gate/up into a FusedGatedMLP, in place.
    Returns each fused Linear with one of the Linears it replaced (all of them read its input,
    so statistics gathered on that one's input — edgelm.gptq's — hold for the fused one)."""
    attention, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = [getattr(attention, name) for name in ATTENTION_PARTS], [getattr(mlp, n) for n in MLP_PARTS]
    attention.qkv_proj = concatenated(qkv)
    for name in ATTENTION_PARTS:
        delattr(attention, name)
    layer.mlp = FusedGatedMLP(concatenated(gate_up), mlp.down_proj, mlp.act_fn)
    return {attention.qkv_proj: qkv[0], layer.mlp.gate_up_proj: gate_up[0]}
