"""Layer reduction: score every decoder (or encoder) layer on calibration text, drop the least needed.

Two measured scores:

- `loss` (default): drop each layer alone and measure how much the calibration loss
  rises; remove the cheapest, then score the rest again (greedy), because layers stand in
  for each other and the second-cheapest alone is not the cheapest next to the first.
- `cosine`: ShortGPT's Block Influence, 1 - cos(layer input, layer output) averaged over
  calibration tokens; one forward pass, so it scales to models where greedy loss scoring
  is too slow, but it only sees how much a layer turns the hidden state, not what that
  costs downstream.

`last` drops the final layers, the naive baseline the scores are measured against.
After a drop, the config (`num_hidden_layers`, per-layer `layer_types`) is rewritten so
that transformers loads the saved folder as an ordinary, shallower model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from edgelm.errors import UnsupportedError

IMPORTANCE_METHODS = ("loss", "cosine", "last")
PER_LAYER_CONFIG_LISTS = ("layer_types",)  # config fields with one entry per layer


def layer_list(model: Any) -> tuple[Any, str, Any]:
    """(parent module, attribute name, ModuleList) of the model's repeated blocks."""
    import torch

    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) == count
            and name.rsplit(".", 1)[-1] in ("layers", "layer")
        ):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            return parent, name.rsplit(".", 1)[-1], module
    raise UnsupportedError(f"{type(model).__name__}: found no list of {count} layers to reduce")


@contextmanager
def keeping_layers(model: Any, keep: list[int]) -> Iterator[None]:
    """Run the model with only the `keep` layers (in order), restoring everything afterwards."""
    import torch

    parent, attr, layers = layer_list(model)
    config = model.config
    saved = {
        name: getattr(config, name) for name in PER_LAYER_CONFIG_LISTS if isinstance(getattr(config, name, None), list)
    }
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in keep]))
    config.num_hidden_layers = len(keep)
    for name, values in saved.items():
        setattr(config, name, [values[i] for i in keep])
    indexed = [m for m in layers.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    original = [m.layer_idx for m in indexed]
    _renumber(getattr(parent, attr))
    try:
        yield
    finally:
        for module, index in zip(indexed, original):
            module.layer_idx = index
        setattr(parent, attr, layers)
        config.num_hidden_layers = len(layers)
        for name, values in saved.items():
            setattr(config, name, values)


def drop_layers(model: Any, drop: list[int]) -> list[int]:
    """Remove layers `drop` from the model for good; returns the kept original indices."""
    import torch

    parent, attr, layers = layer_list(model)
    if len(set(drop)) >= len(layers):
        raise UnsupportedError(f"cannot drop {len(set(drop))} of {len(layers)} layers: at least one must stay")
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    config = model.config
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list):
            setattr(config, name, [values[i] for i in keep])
    if getattr(config, "max_window_layers", None) is not None:  # Qwen2: layers below this index use full attention
        config.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)
    config.num_hidden_layers = len(keep)
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in keep]))
    _renumber(getattr(parent, attr))
    return keep


def _renumber(layers: Any) -> None:
    """Point each layer's attention at its new KV-cache slot."""
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index


def choose_layers_to_drop(
    model: Any,
    count: int,
    method: str,
    batches: list[Any],
    loss_fn: Callable[[Any, list[Any]], float],
    on_score: Callable[[str], None] | None = None,
) -> tuple[list[int], dict[str, Any]]:
    """Pick `count` layers to drop by `method`; returns (sorted indices, the scores measured)."""
    total = layer_list(model)[2].__len__()
    if method not in IMPORTANCE_METHODS:
        raise UnsupportedError(f"unknown layer importance {method!r}; choose one of {', '.join(IMPORTANCE_METHODS)}")
    if not 0 < count < total:
        raise UnsupportedError(f"cannot drop {count} of {total} layers: choose 1..{total - 1}")
    if method == "last":
        return list(range(total - count, total)), {"method": "last"}
    if method == "cosine":
        scores = block_influence(model, batches)
        order = sorted(range(total), key=lambda i: scores[i])
        return sorted(order[:count]), {"method": "cosine", "block_influence": scores}
    kept, dropped, rounds = list(range(total)), [], []
    base = loss_fn(model, batches)
    for round_index in range(count):
        increases = {}
        for index in kept:
            with keeping_layers(model, [i for i in kept if i != index]):
                increases[index] = loss_fn(model, batches) - base
            if on_score:
                on_score(f"round {round_index + 1}/{count}: layer {index}")
        cheapest = min(increases, key=increases.__getitem__)
        rounds.append({"dropped": cheapest, "loss_increase": increases})
        kept.remove(cheapest)
        dropped.append(cheapest)
        with keeping_layers(model, kept):
            base = loss_fn(model, batches)
    return sorted(dropped), {"method": "loss", "calibration_loss_after": base, "rounds": rounds}


def block_influence(model: Any, batches: list[Any]) -> list[float]:
    """1 - mean cosine similarity between each layer's input and output hidden states."""
    import torch

    layers = layer_list(model)[2]
    sums = [0.0] * len(layers)
    count = 0

    def hook(index: int) -> Any:
        def record(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            sums[index] += float((1 - cos).sum())

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch, use_cache=False)
                count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [s / max(1, count) for s in sums]
