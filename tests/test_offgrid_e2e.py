"""End to end on the default model's off-grid twin: the same function as SmolLM2-135M, but its
weights sit on no 4-bit grid (input channels rescaled by factors in [1/2, 2], the inverse
folded into the norms), so a 4-bit recipe cannot look faithful for free. Every int8 and int4
artifact must pass its gates, calibrated, and none may be left out."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mild_twin(tmp_path_factory) -> Path:
    from edgelm.model import inspect_source, load_reference_model
    from edgelm.twins import make_twin, save_twin

    scratch = tmp_path_factory.mktemp("twin")
    model = load_reference_model(inspect_source(None), scratch / "tokenizer")
    save_twin(
        model, scratch / "tokenizer", scratch / "smollm2-mild", make_twin(model, "rescaled", strength=2.0, seed=1)
    )
    return scratch / "smollm2-mild"


def test_the_off_grid_twin_exports_faithful_int8_and_int4(mild_twin, tmp_path):
    from edgelm.export import ExportOptions, export_bundle
    from edgelm.parity import ParitySettings

    options = ExportOptions(
        formats=("onnx", "gguf"), quants=("int8", "int4"), profile=False, parity=ParitySettings(max_tokens=2048)
    )
    manifest = export_bundle(mild_twin, tmp_path / "bundle", options)
    assert "omitted" not in manifest.reference
    by_name = {a.name: a for a in manifest.artifacts}
    assert set(by_name) == {"reference-fp32", "onnx-int8", "onnx-int4", "gguf-int8", "gguf-int4"}
    # the twin computes what the default model computes (15.259 on these 2,048 tokens)
    assert by_name["reference-fp32"].parity["perplexity"] == pytest.approx(15.259, rel=0.005)
    for name in ("onnx-int8", "onnx-int4", "gguf-int8", "gguf-int4"):
        entry = by_name[name]
        assert entry.parity["passed"], (name, entry.parity)
        assert isinstance(entry.recipe["calibration"], dict), name
    # calibrated int8 is close to lossless on the twin (round-to-nearest: 1.027-1.048)
    assert by_name["onnx-int8"].parity["ppl_ratio"] < 1.01
    assert by_name["gguf-int8"].parity["ppl_ratio"] < 1.01
    # 4-bit within the 1.05 on this twin: GPTQ on a searched grid (measured 1.046, 1.027 with
    # act-order) and Q4_K_M (1.032)
    assert by_name["onnx-int4"].parity["ppl_ratio"] <= 1.05
    assert by_name["onnx-int4"].recipe["attempts"][0]["result"] == "passed"  # at the first rung, no 8-bit layers
    assert by_name["gguf-int4"].parity["ppl_ratio"] <= 1.05
