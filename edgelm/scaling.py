"""Activation-aware channel scaling (AWQ-style), folded into the model before any format quantizes it.

A 4-bit block of 32 weights shares one scale, so one large input channel costs the others
their precision; an int8 activation row shares one scale, so one loud channel costs the
others theirs. Multiplying a linear's input channel j by s_j and dividing whatever produces
that channel (an RMSNorm weight, the rows of the projection before it) by s_j computes the
same function in float, but moves the difficulty between weights and activations. The
right s is the one that makes the *quantized* model closest to the float one.

For every scale group of an architecture (`edgelm.architectures.ScaleGroup`: a producer and
the linears reading it) this module collects the consumers' input on calibration text,
then tries s = mean|x|^a / mean|w|^(1-a) for a grid of a (AWQ's search, with the weight
term normalised per block), plus s = 1, and keeps the s whose simulated quantization
(`QuantProxy`: the weight grid and the activation rounding the formats apply) gives the
smallest output error on those inputs. The result is an ordinary float model: every
format's own quantizer then reads better-conditioned weights, so no format needs a new op
and llama.cpp's k-quants get the equivalent of an importance matrix in their input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from edgelm.architectures import ScaleGroup, lookup_architecture
from edgelm.model import copy_sharing_weights

SEARCH_POINTS = 20  # a = 0, 1/20, ..., 19/20
MAX_SAMPLE_ROWS = 512  # calibration tokens kept per group to score candidate scales
# A squared error this far below the signal's (relative) is float rounding, not quantization:
# the grid reproduces the weights already (float32 rounding of a weight on its grid leaves
# ~1e-14; the coarsest error any 8-bit grid leaves is ~1e-6, 4-bit ~1e-3).
REPRODUCED = 1e-10


@dataclass(frozen=True)
class QuantProxy:
    """The quantization the exporters will apply, simulated in torch to score candidate scales.

    Weights: `block` input channels share a scale (0: one per output channel), asymmetric
    (scale and offset) or symmetric. Activations: per-token dynamic rounding to
    `activation_bits` (ExecuTorch's 8da4w/8da8w, the coarsest of the formats' activation
    rounding), or none.
    """

    weight_bits: int
    block: int
    symmetric: bool
    activation_bits: int | None = 8

    def weights(self, w: Any) -> Any:
        """Round-trip `w` [out, in] through the weight grid."""
        rows, cols = w.shape
        block = self.block if self.block and cols % self.block == 0 else cols
        g = w.reshape(rows, cols // block, block)
        if self.symmetric:
            top = 2 ** (self.weight_bits - 1) - 1
            scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / top
            return (g / scale).round().clamp(-top - 1, top).mul(scale).reshape(rows, cols)
        levels = 2**self.weight_bits - 1
        low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-10) / levels
        return ((g - low) / scale).round().clamp(0, levels).mul(scale).add(low).reshape(rows, cols)

    def reproduces(self, w: Any) -> bool:
        """Whether `w` [out, in] already sits on this weight grid (a checkpoint dequantized from a
        Q4_1 GGUF, on the int4 grid): its round trip changes it by float rounding only, so no
        rescaling or GPTQ can quantize it better than round-to-nearest does."""
        w = w.detach().float()
        return float((self.weights(w) - w).pow(2).sum()) <= REPRODUCED * float(w.pow(2).sum())

    def activations(self, x: Any) -> Any:
        if not self.activation_bits:
            return x
        top = 2 ** (self.activation_bits - 1) - 1
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-10) / top
        return (x / scale).round().clamp(-top - 1, top) * scale


# --quant recipe -> what its artifacts do, as scored by the search. int8: per-channel weights and
# per-token int8 activations (ExecuTorch 8da8w, TFLite dynamic range: the activation rounding is
# what 8-bit loses most). int4: the block-32 weight grid only — with activations in the score,
# the search rescaled the default model's weights off the Q4_1 grid they sit on and its ONNX
# int4 went from ratio 1.001 to 1.018; weights alone keep s = 1 wherever the grid already fits.
PROXIES = {
    "int4": QuantProxy(weight_bits=4, block=32, symmetric=False, activation_bits=None),
    "int8": QuantProxy(weight_bits=8, block=0, symmetric=True),
}


@dataclass
class GroupScales:
    layer: int
    group: ScaleGroup
    scales: Any  # 1-D tensor over the consumers' input channels
    ratio: float | None  # the search's a, None when s = 1 won
    error_before: float  # mean squared output error of the simulated quantization at s = 1
    error_after: float
    output_power: float = 0.0  # mean square of the float outputs: errors relative to it compare across layers


@dataclass
class ScalingResult:
    proxy: QuantProxy
    calibration_tokens: int
    groups: list[GroupScales] = field(default_factory=list)

    def layer_sensitivity(self) -> list[float]:
        """Per layer: the simulated quantization's output error relative to the output, summed over its groups."""
        layers = max((g.layer for g in self.groups), default=-1) + 1
        sensitivity = [0.0] * layers
        for g in self.groups:
            sensitivity[g.layer] += g.error_after / g.output_power if g.output_power > 0 else 0.0
        return sensitivity

    def describe(self) -> dict[str, Any]:
        scaled = [g for g in self.groups if g.ratio is not None]
        gain = [g.error_after / g.error_before for g in self.groups if g.error_before > 0]
        return {
            "method": "activation-aware channel scaling (AWQ-style search), folded into norms and projections",
            "proxy": {
                "weight_bits": self.proxy.weight_bits,
                "block": self.proxy.block,
                "symmetric": self.proxy.symmetric,
                "activation_bits": self.proxy.activation_bits,
            },
            "calibration_tokens": self.calibration_tokens,
            "groups": len(self.groups),
            "groups_rescaled": len(scaled),
            "mean_simulated_error_ratio": round(sum(gain) / len(gain), 4) if gain else None,
        }


def layers_of(model: Any) -> Any:
    from edgelm.compress.layers import layer_list

    return layer_list(model)[2]


def applicable_groups(model: Any) -> list[ScaleGroup]:
    """The architecture's scale groups that this model's shapes allow."""
    config = model.config
    arch = lookup_architecture(getattr(config, "model_type", None), "channel scaling")
    heads = getattr(config, "num_attention_heads", None)
    same_heads = getattr(config, "num_key_value_heads", heads) == heads
    return [g for g in arch.scale_groups if same_heads or not g.same_heads]


def fold_scales(layer: Any, group: ScaleGroup, scales: Any) -> None:
    """Multiply the consumers' input channels by `scales` and divide the producer's output by
    them: the layer computes the same function (up to float rounding).

    Each changed weight is a new tensor assigned to its module, never written in place: a
    scaled copy (scale_for_quantization) shares every tensor it does not change with the
    model it was made from (edgelm.model.copy_sharing_weights), the export's parity reference."""
    import torch

    def assign(module: Any, attribute: str, value: Any) -> None:
        setattr(module, attribute, torch.nn.Parameter(value, requires_grad=getattr(module, attribute).requires_grad))

    with torch.no_grad():
        for name in group.consumers:
            consumer = layer.get_submodule(name)
            assign(consumer, "weight", consumer.weight * scales.to(consumer.weight.dtype)[None, :])
        producer = layer.get_submodule(group.producer)
        s = scales.to(producer.weight.dtype)
        if group.fold == "rmsnorm":
            assign(producer, "weight", producer.weight / s)
        elif group.fold == "rmsnorm+1":
            assign(producer, "weight", (1 + producer.weight) / s - 1)
        elif group.fold == "linear":
            assign(producer, "weight", producer.weight / s[:, None])
            if getattr(producer, "bias", None) is not None:
                assign(producer, "bias", producer.bias / s)
        else:
            raise ValueError(f"unknown fold {group.fold!r}")


@contextmanager
def _captured_inputs(model: Any, groups: list[ScaleGroup], keep_every: int) -> Iterator[dict[tuple[int, int], dict]]:
    """While active, record per (layer, group): sum of |x| per channel, token count, and
    every `keep_every`-th token's input row (up to MAX_SAMPLE_ROWS)."""
    stats: dict[tuple[int, int], dict] = {}
    handles = []

    def hook_for(key: tuple[int, int]) -> Callable:
        def hook(_module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            entry = stats.setdefault(key, {"abs_sum": 0, "count": 0, "rows": [], "kept": 0})
            entry["abs_sum"] = entry["abs_sum"] + x.abs().sum(0)
            entry["count"] += x.shape[0]
            if entry["kept"] < MAX_SAMPLE_ROWS:
                rows = x[::keep_every][: MAX_SAMPLE_ROWS - entry["kept"]]
                entry["rows"].append(rows.clone())
                entry["kept"] += rows.shape[0]

        return hook

    for i, layer in enumerate(layers_of(model)):
        for j, group in enumerate(groups):
            handles.append(layer.get_submodule(group.consumers[0]).register_forward_pre_hook(hook_for((i, j))))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _weight_magnitude(weight: Any, block: int) -> Any:
    """Mean over output rows of |w| relative to its block's largest |w|, per input channel."""
    rows, cols = weight.shape
    block = block if block and cols % block == 0 else cols
    g = weight.abs().reshape(rows, cols // block, block)
    return (g / g.amax(-1, keepdim=True).clamp(min=1e-10)).reshape(rows, cols).mean(0)


def search_scales(x: Any, x_mean: Any, weight: Any, proxy: QuantProxy) -> tuple[Any, float | None, float, float, float]:
    """The scales (and the search's a) that minimise the simulated quantized output error.

    x: sampled inputs [n, in]; x_mean: mean |x| per channel over all calibration tokens;
    weight: the consumers' weights stacked [out, in]. Returns (scales, a or None, error at s=1, best error,
    mean square of the float output).
    """
    import torch

    reference = x @ weight.T

    def error(s: Any) -> float:
        out = proxy.activations(x / s) @ proxy.weights(weight * s).T
        return float((out - reference).pow(2).mean())

    ones = torch.ones_like(x_mean)
    baseline = error(ones)
    best = (ones, None, baseline)
    w_mean = _weight_magnitude(weight, proxy.block).clamp(min=1e-6)
    x_mean = x_mean.clamp(min=1e-6)
    for step in range(SEARCH_POINTS):
        a = step / SEARCH_POINTS
        s = x_mean.pow(a) / w_mean.pow(1 - a)
        s = s / (s.max() * s.min()).sqrt()  # centre the range: the product of the extremes is 1
        if not torch.isfinite(s).all():
            continue
        e = error(s)
        if e < best[2]:
            best = (s, a, e)
    return best[0], best[1], baseline, best[2], float(reference.pow(2).mean())


def capture_inputs(model: Any, batches: list[Any]) -> dict[tuple[int, int], dict]:
    """Run the calibration text through the model once and keep, per (layer, scale group), what
    the search needs: mean |x| per input channel and a sample of input rows."""
    import torch

    groups = applicable_groups(model)
    tokens = sum(int(b.numel()) for b in batches)
    keep_every = max(1, tokens // MAX_SAMPLE_ROWS)
    body = getattr(model, "base_model", model)  # the layers without the output head: its logits are not needed
    with torch.inference_mode(), _captured_inputs(model, groups, keep_every) as stats:
        for batch in batches:
            body(input_ids=batch, use_cache=False) if _takes_cache(model) else body(input_ids=batch)
    for entry in stats.values():
        entry["tokens"] = tokens
    return stats


def scale_for_quantization(
    model: Any,
    batches: list[Any],
    proxy: QuantProxy,
    progress: Callable[[int, int], None] | None = None,
    stats: Callable[[], dict[tuple[int, int], dict]] | None = None,
) -> tuple[Any, ScalingResult]:
    """A copy of `model` with activation-aware scales folded in for `proxy`, and what was done.

    `batches`: [1, n] token-id tensors of calibration text (never the parity text); `stats`:
    returns capture_inputs(model, batches), called only when a group needs the inputs (one
    pass serves every recipe). A group whose weights already sit on the proxy's grid keeps
    s = 1 without them: s = 1 is exact whatever the inputs (a model dequantized from a Q4_1
    GGUF, for int4), so such a recipe runs no calibration text at all.
    """
    import torch

    groups = applicable_groups(model)
    result = ScalingResult(proxy=proxy, calibration_tokens=sum(int(b.numel()) for b in batches))
    if not groups:
        return model, result
    captured: dict[tuple[int, int], dict] | None = None
    scaled = copy_sharing_weights(model)  # fold_scales assigns what it changes; the rest stays shared
    layers = layers_of(scaled)
    total = len(layers) * len(groups)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for j, group in enumerate(groups):
                weight = torch.cat([layer.get_submodule(n).weight.detach().float() for n in group.consumers])
                if proxy.activation_bits is None and proxy.reproduces(weight):
                    scales = torch.ones(weight.shape[1])
                    result.groups.append(GroupScales(i, group, scales, None, 0.0, 0.0))
                else:
                    if captured is None:
                        captured = stats() if stats is not None else capture_inputs(model, batches)
                    entry = captured[(i, j)]
                    x = torch.cat(entry["rows"])
                    scales, ratio, before, after, power = search_scales(
                        x, entry["abs_sum"] / entry["count"], weight, proxy
                    )
                    if ratio is not None:
                        fold_scales(layer, group, scales)
                    result.groups.append(GroupScales(i, group, scales, ratio, before, after, power))
                if progress:
                    progress(i * len(groups) + j + 1, total)
    return scaled, result


def _takes_cache(model: Any) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)())


def rescale_randomly(model: Any, low: float, high: float, seed: int = 0) -> int:
    """Make a function-preserving, off-grid twin in place: every scale group's input channels
    multiplied by log-uniform random factors in [low, high], the inverse folded into the
    producer. Weights that sat on a quantization grid no longer do. Returns groups rescaled."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    count = 0
    for layer in layers_of(model):
        for group in applicable_groups(model):
            width = layer.get_submodule(group.consumers[0]).weight.shape[1]
            u = torch.rand(width, generator=generator, dtype=torch.float64)
            scales = torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).float()
            fold_scales(layer, group, scales)
            count += 1
    return count
