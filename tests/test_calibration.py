"""Calibrated quantization: channel scaling keeps the function, lowers the simulated
quantization error, never reads the parity text; a recipe that misses its gate is replaced
by the next one, and an artifact no recipe makes faithful is left out, not the export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import fast_export_options

from edgelm.architectures import ARCHITECTURES
from edgelm.export import export_bundle
from edgelm.scaling import (
    PROXIES,
    applicable_groups,
    rescale_randomly,
    scale_for_quantization,
)


def _load(folder):
    from edgelm.model import inspect_source, load_reference_model

    source = inspect_source(folder)
    return load_reference_model(source, folder.parent / f"{folder.name}-tokenizer")


def _outputs(model, ids):
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "phi3", "bert"])
def test_every_architectures_scale_groups_preserve_the_function(tiny_model_factory, kind):
    model = _load(tiny_model_factory(kind))
    assert applicable_groups(model), f"{kind}: no scale group applies"
    ids = torch.randint(3, 200, (1, 24))
    before = _outputs(model, ids)
    twin = copy.deepcopy(model)
    rescale_randomly(twin, 0.25, 4.0, seed=3)
    changed = [name for name, p in twin.named_parameters() if not torch.equal(p, dict(model.named_parameters())[name])]
    assert changed, "the twin's weights must differ"
    assert torch.allclose(_outputs(twin, ids), before, atol=1e-4, rtol=1e-4)


def test_grouped_attention_skips_the_value_output_pair(tiny_model_factory):
    model = _load(tiny_model_factory("llama"))
    same = model.config.num_key_value_heads == model.config.num_attention_heads
    producers = {g.producer for g in applicable_groups(model)}
    assert ("self_attn.v_proj" in producers) == same
    assert {g.producer for g in ARCHITECTURES["llama"].scale_groups} >= producers


@pytest.mark.parametrize("recipe", ["int4", "int8"])
def test_scaling_undoes_a_rescaled_twin_and_keeps_the_function(tiny_model_factory, recipe):
    model = _load(tiny_model_factory("llama"))
    rescale_randomly(model, 0.25, 4.0, seed=1)
    batches = [torch.randint(3, 200, (1, 64)) for _ in range(4)]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    scaled, result = scale_for_quantization(model, batches, PROXIES[recipe])
    assert scaled is not model
    # the reference is untouched; what scaling left alone (the embedding) is the same storage, not a copy
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    embedding = model.get_input_embeddings().weight
    assert scaled.get_input_embeddings().weight.data_ptr() == embedding.data_ptr()
    rescaled = [g for g in result.groups if g.ratio is not None]
    assert rescaled and not any(
        scaled.model.layers[g.layer].get_submodule(g.group.producer).weight.data_ptr()
        == model.model.layers[g.layer].get_submodule(g.group.producer).weight.data_ptr()
        for g in rescaled
    )
    # never worse than s = 1 on the calibration inputs, and better where the twin broke the grid
    assert all(g.error_after <= g.error_before for g in result.groups)
    assert sum(g.error_after for g in result.groups) < 0.8 * sum(g.error_before for g in result.groups)
    assert result.describe()["groups_rescaled"] > 0
    ids = torch.randint(3, 200, (1, 16))
    assert torch.allclose(_outputs(scaled, ids), _outputs(model, ids), atol=1e-4, rtol=1e-4)


def test_groups_already_on_the_int4_grid_keep_their_scales_without_running_the_text(tiny_model_factory):
    """s = 1 reproduces weights on the grid whatever the inputs: those groups are not searched
    (a scale could only move them off it), and with every group on it the calibration text is
    not run at all; one group off the grid is searched on the captured inputs."""
    model = _load(tiny_model_factory("llama"))
    proxy = PROXIES["int4"]
    for linear in model.modules():
        if isinstance(linear, torch.nn.Linear) and linear.weight.shape[1] % 32 == 0:
            with torch.no_grad():
                linear.weight.copy_(proxy.weights(linear.weight))
    batches = [torch.randint(3, 200, (1, 64)) for _ in range(2)]
    captures = []

    def capture():
        captures.append(1)
        from edgelm.scaling import capture_inputs

        return capture_inputs(model, batches)

    scaled, result = scale_for_quantization(model, batches, proxy, stats=capture)
    assert not captures and result.describe()["groups_rescaled"] == 0
    assert all(g.ratio is None and g.error_after == 0 for g in result.groups)
    assert torch.equal(scaled.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(0.01 * torch.randn_like(model.model.layers[1].mlp.up_proj.weight))
    _, result = scale_for_quantization(model, batches, proxy, stats=capture)
    assert len(captures) == 1
    searched = [g for g in result.groups if g.error_before > 0]
    assert [(g.layer, g.group.producer) for g in searched] == [(1, "post_attention_layernorm")]


def test_calibration_text_never_contains_the_parity_text(tiny_llama):
    from edgelm.calibration import CalibrationSettings, calibration_windows
    from edgelm.parity import parity_text
    from edgelm.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_llama)
    batches, described = calibration_windows(tokenizer, CalibrationSettings(tokens=16_384, window=512))
    assert described["tokens"] == sum(b.numel() for b in batches) >= 8_000
    text = "".join(tokenizer.decode(b[0].tolist()) for b in batches)
    parity = parity_text()
    # every 120-character slice of the parity text, stepped through all of it
    probes = [parity[i : i + 120] for i in range(0, len(parity) - 120, 400)]
    assert probes and not [p for p in probes if p in text]


def test_quantized_artifacts_record_their_calibration(tiny_llama, tmp_path):
    manifest = export_bundle(
        tiny_llama, tmp_path / "b", fast_export_options(profile=False, formats=("onnx",), quants=("fp32", "int4"))
    )
    by_name = {a.name: a for a in manifest.artifacts}
    int4 = by_name["onnx-int4"].recipe
    assert int4["calibration"]["method"].startswith("activation-aware")
    assert int4["calibration"]["calibration_text"]["tokens"] > 0
    assert int4["attempts"][0] == {
        "quant": "int4",
        "calibrated": True,
        "result": "passed",
        **{k: int4["attempts"][0][k] for k in int4["attempts"][0] if k not in ("quant", "calibrated", "result")},
    }
    assert by_name["onnx-fp32"].recipe["calibration"].startswith("none")
    # each 4-bit layer of the calibrated int4 kept GPTQ's codes or round-to-nearest with the block bias
    quantization = by_name["onnx-int4"].signature["quantization"]
    assert quantization["gptq_layers"] >= 1
    assert quantization["gptq_layers"] + quantization["block_bias_correction"] == 4 * 2  # q|k|v, o, gate|up, down
    written = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {a["name"]: a["recipe"]["chosen"] for a in written["artifacts"]}["onnx-int4"] == "int4"
    assert not (tmp_path / "b" / ".calibration-statistics").exists()  # GPTQ's files went with the export


def test_a_quantization_no_recipe_makes_faithful_is_left_out_not_the_export(tiny_llama, tmp_path):
    # an int4 gate no file can meet: every rung of the ladder is tried, the export still succeeds
    options = fast_export_options(profile=False, formats=("gguf",), quants=("fp32", "int4"))
    options.gates = options.gates | {"int4": 0.5}
    manifest = export_bundle(tiny_llama, tmp_path / "b", options)
    assert [a.name for a in manifest.artifacts] == ["reference-fp32", "gguf-fp32"]
    omitted = manifest.reference["omitted"]["gguf-int4"]
    tried = [(a["quant"], a["calibrated"]) for a in omitted["attempts"]]
    assert tried == [("int4", True), ("int4", False), ("Q5_K_M", True), ("Q6_K", True)]
    assert all(a["result"].startswith("ppl ratio") for a in omitted["attempts"])
    assert sorted(p.name for p in (tmp_path / "b" / "gguf").iterdir()) == ["model-F32.gguf"]


def test_a_recipe_that_misses_is_replaced_by_the_next_that_holds(tiny_llama, tmp_path):
    # calibrated and plain int4 miss a gate that Q6_K meets (its ratio sits a bit above 1)
    options = fast_export_options(profile=False, formats=("gguf",), quants=("int4",), calibrate=False)
    probe = export_bundle(tiny_llama, tmp_path / "probe", options)
    int4_ratio = probe.artifacts[1].parity["ppl_ratio"]
    options.gates = options.gates | {"int4": 1 + (int4_ratio - 1) / 4}
    manifest = export_bundle(tiny_llama, tmp_path / "b", options)
    entry = manifest.artifacts[1]
    if int4_ratio <= 1.0:
        pytest.skip(f"this tiny model's int4 ratio is {int4_ratio}: no gate between it and Q6_K")
    assert entry.name == "gguf-int4" and entry.quant in ("Q5_K_M", "Q6_K") and entry.parity["passed"]
    assert entry.recipe["attempts"][0]["result"].startswith("ppl ratio")


def test_an_encoder_whose_int4_misses_its_cosine_gate_still_exports(tiny_model_factory, tmp_path):
    # a float encoder whose int4 is unfaithful (a MiniLM-class model: cosine 0.90 < 0.97): the
    # export completes with the faithful artifacts and says why int4 is not among them
    options = fast_export_options(profile=False, formats=("onnx",), quants=("fp32", "int8", "int4"))
    options.encoder_gates = options.encoder_gates | {"int4": 1.01}  # a cosine no file reaches
    manifest = export_bundle(tiny_model_factory("bert"), tmp_path / "b", options)
    assert [a.name for a in manifest.artifacts] == ["reference-fp32", "onnx-fp32", "onnx-int8"]
    assert "int4 gate" in manifest.reference["omitted"]["onnx-int4"]["reason"]
    assert all(a["result"].startswith("min cosine") for a in manifest.reference["omitted"]["onnx-int4"]["attempts"])
    assert not (tmp_path / "b" / "onnx" / "int4").exists()


def test_gates_bound_kl_and_confident_top1_not_only_perplexity():
    from edgelm.parity import CONFIDENT_TOP1_GATES, KL_GATES, ParityResult

    def result(ratio, kl, top1):
        return ParityResult(
            tokens_scored=100,
            perplexity=15.0 * ratio,
            reference_perplexity=15.0,
            ppl_ratio=ratio,
            top1_agreement=top1,
            mean_kl=kl,
            max_abs_logit_diff_first_window=1.0,
            greedy_match_tokens=10,
            greedy_tokens=64,
            gate=1.10,
            passed=True,
            confident_positions=40,
            confident_top1_agreement=top1,
            max_kl=KL_GATES["int4"],
            min_confident_top1=CONFIDENT_TOP1_GATES["int4"],
        )

    assert result(1.04, 0.02, 0.95).failure() is None
    assert "mean KL" in result(1.04, 0.38, 0.95).failure()  # the drift the ratio hid
    assert "top-1" in result(1.04, 0.05, 0.73).failure()
    assert "ppl ratio" in result(1.20, 0.02, 0.95).failure()


def test_onnx_mixed_precision_keeps_the_chosen_layers_at_8_bits(tiny_llama, tmp_path):
    import onnx

    from edgelm.exporters.onnx import (
        export_decoder_onnx,
        layer_matmuls,
        quantize_weights,
    )
    from edgelm.exporters.onnx_fusion import fuse_projections

    model = _load(tiny_llama)
    export_decoder_onnx(model, tmp_path / "fp32.onnx")
    fp32 = onnx.load(str(tmp_path / "fp32.onnx"))
    assert len(layer_matmuls(fp32, (1,))) == 7  # q, k, v, o, gate, up, down
    fuse_projections(fp32)
    layer1 = layer_matmuls(fp32, (1,))
    assert len(layer1) == 4  # q|k|v, o, gate|up, down
    done = quantize_weights(tmp_path / "fp32.onnx", tmp_path / "q4.onnx", "int4", layers_8bit=(1,))
    assert done["layers_at_8_bits"] == [1]
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in onnx.load(str(tmp_path / "q4.onnx")).graph.node
        if n.op_type == "MatMulNBits"
    }
    assert {bits[f"{name}_Q8"] for name in layer1} == {8}
    assert sum(1 for b in bits.values() if b == 4) == 4 * (model.config.num_hidden_layers - 1)


def test_onnx_quantization_reads_the_torch_weights_instead_of_copying_the_graphs(tiny_llama, tmp_path):
    """source_weights hands the quantizer views of the torch Linears the graph was exported from;
    the file it writes is the one the graph's own copies give."""
    import numpy as np
    import onnx

    from edgelm.exporters.onnx import export_decoder_onnx, quantize_weights, source_weights

    model = _load(tiny_llama)
    export_decoder_onnx(model, tmp_path / "fp32.onnx")
    weights, modules = source_weights(onnx.load(str(tmp_path / "fp32.onnx")), model)
    assert len(modules) == 7 * model.config.num_hidden_layers + 1  # every layer's Linears and the head
    for name, module in modules.items():
        torch_weight = model.get_submodule(module).weight.detach().numpy()
        assert np.shares_memory(weights[name], torch_weight) and weights[name].shape == torch_weight.T.shape
    quantize_weights(tmp_path / "fp32.onnx", tmp_path / "copies.onnx", "int4")
    quantize_weights(tmp_path / "fp32.onnx", tmp_path / "views.onnx", "int4", source=model)
    assert (tmp_path / "copies.onnx").read_bytes() == (tmp_path / "views.onnx").read_bytes()


def test_artifacts_are_built_one_recipe_at_a_time_and_listed_in_the_plans_order(tiny_llama, tmp_path):
    """Every int4 artifact, then every int8 one (one scaled copy of the model held at a time);
    the manifest keeps the preset's order of preference."""
    from edgelm.artifacts import ArtifactBuilder

    plan = [("safetensors", "fp32"), ("gguf", "int4"), ("gguf", "int8"), ("onnx", "int4"), ("onnx", "int8")]
    builder = ArtifactBuilder.__new__(ArtifactBuilder)
    builder.options = fast_export_options()
    assert builder.grouped_by_recipe(plan) == [plan[0], plan[1], plan[3], plan[2], plan[4]]
    manifest = export_bundle(
        tiny_llama,
        tmp_path / "b",
        fast_export_options(profile=False, formats=("gguf", "onnx"), quants=("int4", "int8")),
    )
    assert [a.name for a in manifest.artifacts] == [
        "reference-fp32",
        "gguf-int4",
        "gguf-int8",
        "onnx-int4",
        "onnx-int8",
    ]
    exports = [s["step"] for s in manifest.export_steps if s["step"].startswith("Exporting ") and s["depth"] == 0]
    assert exports == [
        f"Exporting {name}" for name in ("reference-fp32", "gguf-int4", "onnx-int4", "gguf-int8", "onnx-int8")
    ]
