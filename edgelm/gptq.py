"""GPTQ-style error compensation onto a format's own 4-bit grid.

Round-to-nearest quantizes every weight on its own; GPTQ (Frantar et al., 2022) quantizes
one input column at a time and spreads each column's rounding error over the columns not
yet quantized, weighted by the inverse Hessian of the layer's inputs on calibration text
(H = XᵀX): the output error on real activations, not the weight error, is what it
minimises. The grid — each block's scale and integer zero point — has the format's own
form (w = scale · (code − zero_point)), so the result is a set of codes and grid values the
format stores unchanged (no new op). `searched_grid` picks each block's range by weighted
error instead of min/max: a block's outliers then stop stretching the step for the other 31
weights (on the mild off-grid twin, simulated: min/max + GPTQ 1.0653, searched + GPTQ 1.0507).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.model import linears_but_the_head

DAMPING = 0.01  # of the mean diagonal of H, added to it (GPTQ's percdamp)
COLUMN_BLOCK = 128  # columns updated together (lazy batch updates; the result does not depend on it)
GRID_STEPS = 20  # candidate ranges per block, from min/max down to
GRID_SHRINK = 0.6  # this fraction of it


@dataclass
class HessianAccumulator:
    """Σ xxᵀ of one linear layer's inputs over calibration tokens (float32, [in, in]). Linears
    that read the same input share one accumulator.

    Every layer's sum is held in memory only while the calibration text runs through the model;
    `store` then moves it to a file, read back (and freed again) each time a layer's codes are
    picked. Held in memory for the whole export, a 0.5B model's sums were 2.5 GB beside the two
    copies of its weights and the ONNX graph being quantized (its int4 ONNX export step peaked at
    13.5 GB with them and a copy of the graph's weights, 7.4 GB without either). The inverse
    factor GPTQ needs is likewise made when asked."""

    features: int
    tokens: int = 0
    total: Any = None  # the running sum while collecting; None once stored
    file: Path | None = None  # where `store` put it (float32 .npy)
    stored_diagonal: Any = None  # diag Σ xxᵀ, kept in memory when the sum is stored (dead inputs, act-order)

    def add(self, inputs: Any) -> None:
        import torch

        x = inputs.detach().reshape(-1, self.features).to(torch.float32)
        self.total = x.T @ x if self.total is None else self.total + x.T @ x
        self.tokens += x.shape[0]

    def store(self, path: Path) -> None:
        """Move the sum to `path` and free it (the sums() that follow read it back)."""
        import numpy as np

        np.save(path, self.total.numpy())
        self.stored_diagonal = self.total.diagonal().clone()
        self.file, self.total = path, None

    def sums(self) -> Any:
        """Σ xxᵀ as a float32 tensor (read from its file when stored: a fresh copy each call)."""
        if self.file is None:
            return self.total
        import numpy as np
        import torch

        return torch.from_numpy(np.load(self.file))

    def hessian(self) -> Any:
        return self.sums() / max(self.tokens, 1)

    def diagonal(self) -> Any:
        """diag Σ xxᵀ, without reading a stored sum back (it is [in] where the sum is [in, in])."""
        return self.total.diagonal() if self.file is None else self.stored_diagonal

    def dead(self) -> Any:
        """Input channels that were zero on every calibration token."""
        return self.diagonal() == 0

    def activation_order(self) -> Any:
        """Input columns by decreasing energy (diag H): GPTQ's act-order, the columns that move
        the output most quantized first, while the most columns are left to absorb their error."""
        import torch

        return torch.argsort(self.diagonal(), descending=True)

    def permuted_factor(self, order: Any, hessian: Any = None) -> Any:
        """The upper Cholesky factor of the damped H⁻¹ (float64 to factor, float32 to use) with rows
        and columns in `order` (None: as is). `hessian`: this accumulator's hessian() where the
        caller holds it already (left unchanged)."""
        import torch

        h = (self.hessian() if hessian is None else hessian).to(torch.float64, copy=True)
        dead = self.dead()
        h[dead, dead] = 1
        h += DAMPING * torch.mean(torch.diag(h)) * torch.eye(self.features, dtype=torch.float64)
        if order is not None:
            h = h[order][:, order]
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def searched_grid(weight: Any, importance: Any, block_size: int, max_code: int = 15) -> tuple[Any, Any]:
    """Per block of `weight` [out, in]: the scale and integer zero point (both [out, in / block])
    among GRID_STEPS ranges shrunk from the block's min/max (which always holds 0) whose
    round-to-nearest error, weighted per input column by `importance` (diag H: how much that
    input moves the output), is least."""
    import torch

    out, columns = weight.shape
    blocks = weight.to(torch.float32).reshape(out, columns // block_size, block_size)
    weights = importance.to(torch.float32).reshape(1, columns // block_size, block_size)
    low, high = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
    best_error = torch.full(low.shape, float("inf"))
    best_scale, best_zero = torch.ones_like(low), torch.zeros_like(low)
    for step in range(GRID_STEPS):
        shrink = 1 - (1 - GRID_SHRINK) * step / (GRID_STEPS - 1)
        scale = (high - low) * shrink / max_code
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero block
        zero = torch.clamp(torch.round(-low * shrink / scale), 0, max_code)
        codes = torch.clamp(torch.round(blocks / scale[..., None]) + zero[..., None], 0, max_code)
        error = (((codes - zero[..., None]) * scale[..., None] - blocks) ** 2 * weights).sum(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq_codes(
    weight: Any,
    inputs: HessianAccumulator,
    scales: Any,
    zero_points: Any,
    block_size: int,
    max_code: int = 15,
    act_order: bool = True,
    hessian: Any = None,
) -> Any:
    """Integer codes in [0, max_code] for `weight` [out, in] on the grid w = scale · (code − zero_point).

    `inputs`: the layer's input statistics; `scales` and `zero_points` are [out, in / block_size]:
    the format's own per-block grid, fixed beforehand, so `act_order` (GPTQ's desc_act: columns
    quantized by decreasing diag H, the ones that move the output most first, while the most
    columns are left to absorb their error) keeps every block's grid. Simulated on the mild
    off-grid twin, ExecuTorch's int4 recipe: 1.062 in column order, 1.045 with act-order.
    `hessian`: inputs.hessian() where the caller holds it already, so a stored sum is not read
    from its file a second time. Returns codes [out, in] (int64), in the weight's own column order.
    """
    import torch

    w = weight.detach().to(torch.float32).clone()
    columns = w.shape[1]
    w[:, inputs.dead()] = 0
    scale = scales.to(torch.float32).repeat_interleave(block_size, dim=1)[:, :columns]
    zero = zero_points.to(torch.float32).repeat_interleave(block_size, dim=1)[:, :columns]
    order = inputs.activation_order() if act_order else None
    if order is not None:
        w, scale, zero = w[:, order], scale[:, order], zero[:, order]
    upper = inputs.permuted_factor(order, hessian)
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero block: every code is its zero point
    codes = torch.empty_like(w, dtype=torch.int64)
    for start in range(0, columns, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            column, s, z = block[:, i], scale[:, start + i], zero[:, start + i]
            code = torch.clamp(torch.round(column / divisor[:, start + i]) + z, 0, max_code)
            codes[:, start + i] = code.to(torch.int64)
            error = (column - (code - z) * s) / inverse[i, i]
            block[:, i:].addr_(error, inverse[i, i:], alpha=-1)  # spread this column's error over the rest
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    return codes


def output_error(difference: Any, hessian: Any) -> float:
    """tr(E H Eᵀ) for a weight error E [out, in] (a tensor or an array): the layer's mean squared
    output error on the calibration inputs whose Σ xxᵀ / tokens is H (computed in H's dtype)."""
    import torch

    e = torch.as_tensor(difference, dtype=hessian.dtype)
    return float(((e @ hessian) * e).sum())


def collect_hessians(
    model: Any,
    batches: list[Any],
    wanted: Callable[[Any], bool] | None = None,
) -> dict[str, HessianAccumulator]:
    """Σ xxᵀ of every Linear's input over the calibration batches, by module name (the output
    head excepted: it stays 8-bit). Linears that read the same tensor (q/k/v, gate/up) share
    one accumulator, so memory is one matrix per distinct input. `wanted(module)`: only those
    Linears (None: all); with none wanted, the calibration text is not run at all."""
    import torch

    linears = {name: module for name, module in linears_but_the_head(model) if wanted is None or wanted(module)}
    if not linears:
        return {}
    sums: dict[str, HessianAccumulator] = {}
    seen: dict[int, tuple[Any, str]] = {}  # id of an input in this batch -> (the tensor, kept alive; its first reader)

    def hook(name: str) -> Any:
        def record(_module: Any, args: tuple) -> None:
            x = args[0]
            first = seen.setdefault(id(x), (x, name))[1]
            if first not in sums:
                sums[first] = HessianAccumulator(x.shape[-1])
            if first == name:
                sums[name].add(x)
            else:
                sums[name] = sums[first]

        return record

    body = getattr(model, "base_model", model)
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                body(input_ids=batch)  # the layers only: the head's logits are not needed
                seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return sums


def weight_fingerprint(weight_in_by_out: Any) -> str:
    """Identify a float weight by its bytes, [in, out] as an ONNX MatMul stores it."""
    import hashlib

    import numpy as np

    return hashlib.sha1(np.ascontiguousarray(weight_in_by_out, dtype=np.float32).tobytes()).hexdigest()
