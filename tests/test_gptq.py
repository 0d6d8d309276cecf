"""GPTQ error compensation (edgelm.gptq) and its MatMulNBits packing (exporters/onnx_gptq.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelm.exporters.onnx_block_bias import pack_nibbles, unpack_nibbles
from edgelm.gptq import HessianAccumulator, collect_hessians, gptq_codes

BLOCK = 32


def asymmetric_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """onnxruntime's block grid: range widened to include 0, scale (max − min)/15, integer zero point."""
    blocks = weight.unflatten(-1, (-1, BLOCK))
    low, high = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
    scale = (high - low) / 15
    return scale, torch.clamp(torch.round(-low / scale), 0, 15)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.double() - zero.repeat_interleave(BLOCK, 1)) * scale.repeat_interleave(BLOCK, 1)


def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.clamp(
        torch.round(weight / scale.repeat_interleave(BLOCK, 1)) + zero.repeat_interleave(BLOCK, 1), 0, 15
    )


@pytest.mark.parametrize("act_order", [False, True])
def test_with_uncorrelated_inputs_gptq_is_round_to_nearest(act_order):
    """A diagonal H leaves no error to spread: the codes are round-to-nearest's, in the weight's
    own column order also when GPTQ visits the columns by decreasing energy."""
    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    scale, zero = asymmetric_grid(weight)
    uncorrelated = HessianAccumulator(128)
    uncorrelated.add(torch.diag(torch.rand(128) + 0.5))  # Σ xxᵀ diagonal, every channel's energy different
    assert act_order is False or not torch.equal(uncorrelated.activation_order(), torch.arange(128))
    codes = gptq_codes(weight, uncorrelated, scale, zero, BLOCK, act_order=act_order)
    assert torch.equal(codes, round_to_nearest(weight, scale, zero).long())


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    torch.manual_seed(0)
    mixing = torch.randn(128, 128) + 3 * torch.eye(128)
    inputs = torch.randn(4096, 128) @ mixing  # correlated channels, as a layer's real inputs are
    weight = torch.randn(64, 128)
    scale, zero = asymmetric_grid(weight)
    accumulator = HessianAccumulator(128)
    accumulator.add(inputs)
    gptq = dequantize(gptq_codes(weight, accumulator, scale, zero, BLOCK), scale, zero)
    rtn = dequantize(round_to_nearest(weight, scale, zero), scale, zero)
    x = inputs.double()

    def error(q: torch.Tensor) -> float:
        return float(((x @ weight.double().T - x @ q.T) ** 2).mean())

    assert error(gptq) < 0.7 * error(rtn)
    codes = gptq_codes(weight, accumulator, scale, zero, BLOCK)
    assert codes.min() >= 0 and codes.max() <= 15  # on the format's own grid, nothing re-rounded
    ordered = dequantize(gptq_codes(weight, accumulator, scale, zero, BLOCK, act_order=True), scale, zero)
    assert error(ordered) < 0.7 * error(rtn)


def test_nibbles_round_trip_low_first():
    codes = np.random.default_rng(0).integers(0, 16, size=(5, 64))
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 32) and packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)
    np.testing.assert_array_equal(unpack_nibbles(packed, 64), codes)


def test_hessians_are_shared_by_linears_reading_the_same_input(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    sums = collect_hessians(model, [torch.randint(0, 100, (1, 24)) for _ in range(2)])
    layer = "model.layers.0"
    assert sums[f"{layer}.self_attn.q_proj"] is sums[f"{layer}.self_attn.k_proj"] is sums[f"{layer}.self_attn.v_proj"]
    assert sums[f"{layer}.mlp.gate_proj"] is sums[f"{layer}.mlp.up_proj"]
    assert sums[f"{layer}.self_attn.q_proj"] is not sums[f"{layer}.mlp.gate_proj"]
    assert sums[f"{layer}.mlp.down_proj"].tokens == 48 and "lm_head" not in sums
    hessian = sums[f"{layer}.mlp.down_proj"].hessian()
    assert torch.allclose(hessian, hessian.T) and bool((torch.diag(hessian) > 0).all())


def one_matmul_nbits(weight: np.ndarray):
    """A one-MatMul ONNX model quantized by onnxruntime's own 4-bit quantizer (edgelm's settings)."""
    from onnx import TensorProto, helper, numpy_helper

    from edgelm.exporters.onnx import _matmul_nbits

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _matmul_nbits(model, 4)


def test_each_layer_keeps_gptq_or_the_block_bias_whichever_errs_less():
    from onnx import numpy_helper

    from edgelm.exporters.onnx_gptq import apply_gptq

    rng = np.random.default_rng(0)
    k, n = 128, 48
    accumulator = HessianAccumulator(k)
    accumulator.add(torch.from_numpy(rng.standard_normal((2048, k)) @ (rng.standard_normal((k, k)) + 3 * np.eye(k))))
    # on a float-offset 4-bit grid (as a Q4_1 GGUF's weights are): the block bias rebuilds it exactly
    on_grid = (
        (
            rng.integers(0, 16, (n, k // BLOCK, BLOCK)) * rng.uniform(0.01, 0.02, (n, k // BLOCK, 1))
            + rng.uniform(-0.2, 0, (n, k // BLOCK, 1))
        )
        .reshape(n, k)
        .T
    )
    off_grid = rng.standard_normal((k, n))
    for weight, recoded in ((on_grid, set()), (off_grid, {"w"})):
        model = one_matmul_nbits(weight)
        before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
        done = apply_gptq(
            model,
            {"w": weight.astype(np.float32)},
            {"layer": accumulator},
            {"w": "layer"},
        )
        assert done == recoded
        after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert all(np.array_equal(before[name], after[name]) for name in after) == (not recoded)


def test_searched_grid_never_errs_more_than_min_max_per_block():
    from edgelm.gptq import searched_grid

    torch.manual_seed(0)
    weight = torch.randn(64, 256) * torch.rand(1, 256) * 3  # input channels of unequal spread
    importance = torch.rand(256)
    scale, zero = searched_grid(weight, importance, BLOCK)
    low_scale, low_zero = asymmetric_grid(weight)

    def error(scale, zero):
        rounded = dequantize(round_to_nearest(weight, scale, zero), scale, zero)
        return (((rounded - weight) ** 2) * importance).unflatten(-1, (-1, BLOCK)).sum(-1)

    assert torch.all(zero == torch.round(zero)) and zero.min() >= 0 and zero.max() <= 15
    searched, min_max = error(scale, zero), error(low_scale, low_zero)
    assert torch.all(searched <= min_max + 1e-9)
    assert searched.sum() < 0.95 * min_max.sum()


def test_the_written_grid_and_codes_are_what_onnxruntime_computes_with():
    """An odd number of blocks per row (3): zero points are packed two per byte with padding."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from edgelm.exporters.onnx_block_bias import dequantize_matmul_nbits
    from edgelm.exporters.onnx_gptq import apply_gptq
    from edgelm.gptq import output_error

    rng = np.random.default_rng(1)
    k, n = 96, 40
    inputs = rng.standard_normal((2048, k)) @ (rng.standard_normal((k, k)) + 3 * np.eye(k))
    accumulator = HessianAccumulator(k)
    accumulator.add(torch.from_numpy(inputs))
    weight = (rng.standard_normal((k, n)) * rng.uniform(0.3, 3, (k, 1))).astype(np.float32)
    model = one_matmul_nbits(weight)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(node for node in model.graph.node if node.op_type == "MatMulNBits")
    round_to_nearest_weight = dequantize_matmul_nbits(*(inits[name] for name in node.input[1:4]), k, n, BLOCK)
    assert apply_gptq(model, {"w": weight}, {"layer": accumulator}, {"w": "layer"}) == {"w"}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    written = dequantize_matmul_nbits(*(inits[name] for name in node.input[1:4]), k, n, BLOCK)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, k)).astype(np.float32)
    expected = x @ written  # accuracy_level 4 rounds x to 8 bits per block: ~0.5% of the output's range
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, atol=0.01 * np.abs(expected).max())
    hessian = accumulator.hessian().double()
    assert output_error((weight - written).T, hessian) < 0.8 * output_error(
        (weight - round_to_nearest_weight).T, hessian
    )
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "block_size")) == BLOCK


def test_fitted_block_offsets_recover_a_grid_never_lose_to_the_mean_and_keep_unseen_blocks():
    """block_bias.fitted_offsets: least squares of the output error over one offset per block."""
    import torch

    from edgelm.exporters.block_bias import fitted_offsets, spread

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3 + torch.randn(128, generator=g)
    x[:, 96:] = 0  # the last block never sees an input on the calibration text
    h = x.T @ x / x.shape[0]
    weight = torch.randn(16, 128, generator=g)
    symmetric = torch.clamp(torch.round(weight / 0.3), -8, 7) * 0.3

    def error(offsets):
        e = weight - symmetric - spread(offsets)
        return float(((e @ h) * e).sum())

    mean = (weight - symmetric).unflatten(-1, (-1, 32)).mean(-1)
    fitted = fitted_offsets(weight, symmetric, h, mean)
    assert error(fitted) < error(mean)
    assert torch.equal(fitted[:, 3], mean[:, 3])  # unseen: the fallback, untouched
    true = torch.randn(16, 4, generator=g)
    on_grid = symmetric + spread(true)
    recovered = fitted_offsets(on_grid, symmetric, h, torch.zeros(16, 4))
    assert torch.allclose(recovered[:, :3], true[:, :3], atol=1e-4)
    assert torch.equal(fitted_offsets(on_grid, symmetric, h, true), true)  # already exact: kept as is


def test_stored_sums_pick_the_same_codes_and_leave_memory(tmp_path):
    """A stored accumulator holds no sum in memory and gives GPTQ exactly what it gave before."""
    torch.manual_seed(0)
    accumulator = HessianAccumulator(64)
    accumulator.add(torch.randn(512, 64) @ (torch.randn(64, 64) + 3 * torch.eye(64)))
    weight = torch.randn(24, 64)
    scale, zero = asymmetric_grid(weight)
    in_memory = gptq_codes(weight, accumulator, scale, zero, BLOCK)
    hessian = accumulator.hessian()
    accumulator.store(tmp_path / "sums.npy")
    assert accumulator.total is None and (tmp_path / "sums.npy").stat().st_size >= 64 * 64 * 4
    assert torch.equal(accumulator.hessian(), hessian)
    assert torch.equal(gptq_codes(weight, accumulator, scale, zero, BLOCK), in_memory)
    # one layer's codes read the stored sum once (the factor); the diagonal stays in memory
    reads = []
    original_sums = HessianAccumulator.sums
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HessianAccumulator, "sums", lambda self: reads.append(1) or original_sums(self))
        assert torch.equal(gptq_codes(weight, accumulator, scale, zero, BLOCK), in_memory)
        assert len(reads) == 1
        # a caller that read the hessian already (to search its grid) hands it over: no second read
        held = accumulator.hessian()
        assert torch.equal(gptq_codes(weight, accumulator, scale, zero, BLOCK, hessian=held), in_memory)
        assert len(reads) == 2 and torch.equal(held, hessian)  # the one read for `held`; held unchanged


def test_calibration_statistics_live_in_their_folder_until_released(tiny_llama, tmp_path):
    from edgelm.calibration import Calibration, CalibrationSettings
    from edgelm.model import inspect_source, load_reference_model
    from edgelm.tokenizer import Tokenizer

    model = load_reference_model(inspect_source(tiny_llama), tmp_path / "tokenizer")
    folder = tmp_path / "statistics"
    calibration = Calibration(
        model, Tokenizer(tmp_path / "tokenizer"), CalibrationSettings(tokens=256, window=64), statistics=folder
    )
    sums = calibration.hessians("int4")
    distinct = {id(a): a for a in sums.values()}.values()
    assert all(a.total is None and a.file.parent == folder / "int4" for a in distinct)
    assert len(list((folder / "int4").iterdir())) == len(distinct) == 4 * model.config.num_hidden_layers
    calibration.release({"int4"})
    assert (folder / "int4").is_dir()
    calibration.release(set())
    assert not folder.exists()


def test_the_fitted_offsets_error_is_the_output_error_they_leave():
    """block_bias._fitted computes tr(E H Eᵀ) from the least-squares terms instead of anew: the
    same number, for the fitted offsets and for a fallback kept."""
    import torch

    from edgelm.exporters.block_bias import _fitted, spread
    from edgelm.gptq import output_error

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 96, generator=g) @ torch.randn(96, 96, generator=g)
    h = x.T @ x / x.shape[0]
    weight = torch.randn(24, 96, generator=g)
    symmetric = torch.clamp(torch.round(weight / 0.25), -8, 7) * 0.25
    for fallback in (torch.zeros(24, 3), (weight - symmetric).unflatten(-1, (-1, 32)).mean(-1)):
        offsets, error = _fitted(weight, symmetric, h, fallback)
        direct = output_error((weight - symmetric - spread(offsets)).double(), h.double())
        assert abs(error - direct) <= 1e-6 * direct, (error, direct)  # the offsets are stored as float32


def _onto_the_int4_grid(linear: torch.nn.Linear) -> None:
    """Put `linear`'s weight on the int4 recipe's block grid (as a Q4_1 GGUF's dequantized weights sit)."""
    from edgelm.scaling import PROXIES

    with torch.no_grad():
        linear.weight.copy_(PROXIES["int4"].weights(linear.weight.float()))


def test_only_the_wanted_linears_get_statistics_and_none_wanted_runs_nothing(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    batches = [torch.randint(0, 100, (1, 24))]
    down = model.model.layers[0].mlp.down_proj
    sums = collect_hessians(model, batches, wanted=lambda module: module is not down)
    assert "model.layers.0.mlp.down_proj" not in sums and "model.layers.1.mlp.down_proj" in sums
    assert sums["model.layers.0.mlp.gate_proj"].tokens == 24

    def no_forward(*_args, **_kwargs):
        raise AssertionError("the calibration text was run with no statistics to collect")

    model.model.forward = no_forward
    assert collect_hessians(model, batches, wanted=lambda module: False) == {}


def test_layers_already_on_the_grid_get_no_gptq_statistics_and_the_record_counts_them(tiny_llama, tmp_path):
    from edgelm.calibration import Calibration, CalibrationSettings
    from edgelm.model import inspect_source, load_reference_model
    from edgelm.scaling import PROXIES
    from edgelm.tokenizer import Tokenizer

    model = load_reference_model(inspect_source(tiny_llama), tmp_path / "tokenizer")
    on_grid = [model.model.layers[0].self_attn.o_proj, model.model.layers[1].mlp.down_proj]
    for linear in on_grid:
        _onto_the_int4_grid(linear)
    assert all(PROXIES["int4"].reproduces(linear.weight) for linear in on_grid)
    assert not PROXIES["int4"].reproduces(model.model.layers[0].mlp.down_proj.weight)  # random weights are off it
    calibration = Calibration(model, Tokenizer(tmp_path / "tokenizer"), CalibrationSettings(tokens=256, window=64))
    sums = calibration.hessians("int4")
    assert "model.layers.0.self_attn.o_proj" not in sums and "model.layers.1.mlp.down_proj" not in sums
    assert "model.layers.0.self_attn.q_proj" in sums and "model.layers.1.self_attn.o_proj" in sums
    linears = 7 * model.config.num_hidden_layers
    statistics = calibration.scaled_model("int4")[1]["gptq_statistics"]
    assert statistics == {"layers": linears - 2, "layers_on_the_grid": 2}
