"""Pruning: zero out weights (unstructured, 2:4) or cut whole heads and MLP channels (structured).

Unstructured and 2:4 sparsity leave every matrix its shape: the zeros compress in a zip
but not in any of the four formats, whose files keep dense tensors (GGUF, ONNX, .pte and
.tflite have no sparse weight layout the runtimes here execute). They are worth it only
for a runtime with sparse kernels or as a step before structured pruning; the report
says so and shows the exported size. Structured pruning really shrinks the matrices:
the same number of heads (whole key/value groups, so grouped-query attention stays
regular) and MLP channels leaves every layer, so the config stays one transformers loads.

Which heads and channels go is measured on calibration text (as Wanda does for weights):
a channel's score is the mean |activation| entering the down projection times the norm
of its column there; a head group's score is the same for the attention output entering
the output projection. Unstructured scores are |weight| (L1), globally or per matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edgelm.architectures import head_dim as config_head_dim
from edgelm.compress.layers import layer_list
from edgelm.errors import UnsupportedError

PRUNE_METHODS = ("l1", "l1-layer", "2:4", "heads", "channels")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ENCODER_MLP = ("intermediate.dense", "output.dense")


def prunable_linears(model: Any) -> Iterator[tuple[str, Any]]:
    """(name, Linear) of every matrix inside the repeated layers: embeddings and the head are left whole."""
    import torch

    _, _, layers = layer_list(model)
    prefix = {id(layer): i for i, layer in enumerate(layers)}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(id(m) in prefix for m in _ancestors(model, name)):
            yield name, module


def _ancestors(model: Any, name: str) -> Iterator[Any]:
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))


def magnitude_masks(model: Any, sparsity: float, scope: str = "global") -> dict[str, Any]:
    """0/1 masks (parameter name → mask) removing the `sparsity` fraction of smallest |w|."""
    import torch

    if not 0 < sparsity < 1:
        raise UnsupportedError(f"sparsity {sparsity} is not between 0 and 1")
    linears = list(prunable_linears(model))
    if scope == "global":
        magnitudes = torch.cat([m.weight.detach().abs().reshape(-1) for _, m in linears])
        k = max(1, int(sparsity * magnitudes.numel()))
        threshold = magnitudes.kthvalue(k).values
        return {f"{name}.weight": (m.weight.detach().abs() > threshold).to(m.weight.dtype) for name, m in linears}
    masks = {}
    for name, m in linears:
        w = m.weight.detach().abs().reshape(-1)
        threshold = w.kthvalue(max(1, int(sparsity * w.numel()))).values
        masks[f"{name}.weight"] = (m.weight.detach().abs() > threshold).to(m.weight.dtype)
    return masks


def two_four_masks(model: Any) -> dict[str, Any]:
    """Keep the 2 largest |w| of every 4 consecutive inputs of each row (NVIDIA's 2:4 pattern)."""
    import torch

    masks = {}
    for name, m in prunable_linears(model):
        w = m.weight.detach()
        if w.shape[1] % 4:
            raise UnsupportedError(f"{name}: {w.shape[1]} inputs is not a multiple of 4; 2:4 sparsity needs one")
        groups = w.abs().reshape(w.shape[0], -1, 4)
        keep = groups.topk(2, dim=-1).indices
        mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
        masks[f"{name}.weight"] = mask.reshape(w.shape)
    return masks


def apply_masks(model: Any, masks: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def sparsity_of(model: Any) -> float:
    """Fraction of exact zeros across the prunable matrices."""
    zeros = total = 0
    for _, m in prunable_linears(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(1, total)


def _input_activation_norms(model: Any, modules: dict[str, Any], batches: list[Any]) -> dict[str, Any]:
    """Mean |x| per input feature of each module in `modules`, over the calibration batches."""
    import torch

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(_module: Any, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in modules}


def _shrink_linear(linear: Any, *, rows: Any = None, cols: Any = None) -> Any:
    """A new Linear holding only `rows` (outputs) and/or `cols` (inputs) of `linear`."""
    import torch

    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _mlp_parts(layer: Any) -> tuple[Any, list[str], str]:
    """(owner module, up-side linear names, down linear name) of a layer's MLP, or refuse."""
    if hasattr(layer, "mlp") and all(hasattr(layer.mlp, n) for n in MLP):
        return layer.mlp, ["gate_proj", "up_proj"], "down_proj"
    if hasattr(layer, "intermediate") and hasattr(layer, "output"):  # BERT-style encoder
        return layer, ["intermediate.dense"], "output.dense"
    raise UnsupportedError(
        f"{type(layer).__name__}: structured channel pruning knows separate gate/up/down "
        "(Llama, Qwen2, Gemma3) or BERT MLPs; this layer fuses them"
    )


def prune_channels(model: Any, fraction: float, batches: list[Any]) -> dict[str, Any]:
    """Remove `fraction` of the MLP channels from every layer; returns the width before and after."""
    import torch

    _, _, layers = layer_list(model)
    parts = [_mlp_parts(layer) for layer in layers]
    width = model.config.intermediate_size
    keep_count = max(1, round(width * (1 - fraction)))
    downs = {str(i): owner.get_submodule(down) for i, (owner, _, down) in enumerate(parts)}
    activity = _input_activation_norms(model, downs, batches)
    for i, (owner, ups, down) in enumerate(parts):
        score = activity[str(i)] * downs[str(i)].weight.detach().norm(dim=0)
        keep = torch.sort(score.topk(keep_count).indices).values
        for name in ups:
            _replace(owner, name, _shrink_linear(owner.get_submodule(name), rows=keep))
        _replace(owner, down, _shrink_linear(owner.get_submodule(down), cols=keep))
    model.config.intermediate_size = keep_count
    return {"intermediate_size": [width, keep_count]}


def prune_heads(model: Any, fraction: float, batches: list[Any]) -> dict[str, Any]:
    """Remove `fraction` of the key/value head groups (with their query heads) from every layer."""
    import torch

    config = model.config
    _, _, layers = layer_list(model)
    if not all(hasattr(layer, "self_attn") and all(hasattr(layer.self_attn, n) for n in ATTENTION) for layer in layers):
        raise UnsupportedError(
            "structured head pruning knows decoders with separate q/k/v/o projections "
            "(Llama, Qwen2, Gemma3); this model's attention is laid out differently"
        )
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    head_dim = config_head_dim(config)
    group = heads // kv_heads
    keep_groups = max(1, round(kv_heads * (1 - fraction)))
    if keep_groups == kv_heads:
        raise UnsupportedError(f"pruning {fraction:.0%} of {kv_heads} key/value head groups removes none; ask for more")
    outs = {str(i): layer.self_attn.o_proj for i, layer in enumerate(layers)}
    activity = _input_activation_norms(model, outs, batches)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        score = (activity[str(i)] * attn.o_proj.weight.detach().norm(dim=0)).reshape(kv_heads, group * head_dim).sum(-1)
        groups = torch.sort(score.topk(keep_groups).indices).values
        kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups.tolist()])
        q_rows = torch.cat([torch.arange(g * group * head_dim, (g + 1) * group * head_dim) for g in groups.tolist()])
        attn.q_proj = _shrink_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = _shrink_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = _shrink_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = _shrink_linear(attn.o_proj, cols=q_rows)
        for attr in ("num_heads", "num_attention_heads"):
            if hasattr(attn, attr):
                setattr(attn, attr, keep_groups * group)
        for attr in ("num_key_value_heads",):
            if hasattr(attn, attr):
                setattr(attn, attr, keep_groups)
    config.num_attention_heads = keep_groups * group
    config.num_key_value_heads = keep_groups
    config.head_dim = head_dim  # no longer hidden_size / heads: say it explicitly
    return {"num_attention_heads": [heads, keep_groups * group], "num_key_value_heads": [kv_heads, keep_groups]}


def _replace(owner: Any, dotted: str, new: Any) -> None:
    parent, _, attr = dotted.rpartition(".")
    setattr(owner.get_submodule(parent) if parent else owner, attr, new)


def prune(model: Any, method: str, sparsity: float, batches: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply `method`; returns (masks to keep during distillation, a record of what changed)."""
    if method not in PRUNE_METHODS:
        raise UnsupportedError(f"unknown pruning method {method!r}; choose one of {', '.join(PRUNE_METHODS)}")
    if method in ("l1", "l1-layer"):
        masks = magnitude_masks(model, sparsity, "global" if method == "l1" else "layer")
        apply_masks(model, masks)
        return masks, {"sparsity_reached": round(sparsity_of(model), 4), "shrinks_files": False}
    if method == "2:4":
        masks = two_four_masks(model)
        apply_masks(model, masks)
        return masks, {"sparsity_reached": round(sparsity_of(model), 4), "shrinks_files": False}
    if not 0 < sparsity < 1:
        raise UnsupportedError(f"fraction {sparsity} is not between 0 and 1")
    change = prune_channels(model, sparsity, batches) if method == "channels" else prune_heads(model, sparsity, batches)
    return {}, change | {"shrinks_files": True}
