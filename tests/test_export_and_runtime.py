"""export_bundle → bundle → edgelm.load, on a tiny random Llama; and the bundle's guarantees."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import fast_export_options

import edgelm
from edgelm.bundle import MANIFEST, read_bundle, validate_manifest
from edgelm.errors import BundleError, DeviceError
from edgelm.export import export_bundle


def test_bundle_has_manifest_tokenizer_card_report_and_reference(tiny_bundle):
    for rel in [
        "manifest.json",
        "tokenizer/tokenizer.json",
        "README.md",
        "report/report.json",
        "report/report.md",
        "report/report.html",
        "report/plots/decode_tok_s.png",
        "report/plots/size_vs_perplexity.png",
        "reference/model.safetensors",
    ]:
        assert (tiny_bundle / rel).is_file(), rel
    manifest = read_bundle(tiny_bundle)
    entry = manifest.artifact("safetensors")
    assert entry.parity["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert entry.parity["top1_agreement"] == 1.0
    assert entry.parity["greedy_match_tokens"] == entry.parity["greedy_tokens"] == 64
    assert entry.profile["decode_tok_s"] > 0 and entry.profile["peak_rss_mb"] > 0
    assert "base_model_relation: quantized" in (tiny_bundle / "README.md").read_text()
    rows = json.loads((tiny_bundle / "report/report.json").read_text())["rows"]
    assert rows[0]["perplexity"] == pytest.approx(entry.parity["perplexity"])
    # where the export's time went, step by step; the reference memo's scratch logits are gone
    steps = [s["step"] for s in manifest.export_steps]
    assert steps[0] == "Inspecting the source model" and any(s.startswith("Measuring parity") for s in steps)
    assert "Export steps" in (tiny_bundle / "report/report.md").read_text()
    assert not any(".reference-logits" in rel for rel in manifest.files)


def test_reference_perplexity_of_random_model_is_near_vocab_size(tiny_bundle):
    """A random model is close to uniform: perplexity near the vocab size, a real measurement."""
    ppl = read_bundle(tiny_bundle).artifacts[0].parity["perplexity"]
    assert 200 < ppl < 600


def test_load_generate_and_stream_agree(tiny_bundle):
    lm = edgelm.load(tiny_bundle)
    text = lm.generate("Hello", max_new_tokens=12, ignore_eos=True)
    assert text == "".join(lm.stream("Hello", max_new_tokens=12, ignore_eos=True))
    assert len(text) > 0


def test_session_prefill_then_decode_matches_one_full_prefill(tiny_bundle):
    session = edgelm.load(tiny_bundle).session()
    ids = np.array([5, 17, 42, 99, 7], dtype=np.int64)
    session.reset()
    full = session.prefill(ids)
    session.reset()
    session.prefill(ids[:3])
    step3 = session.decode(int(ids[3]))
    step4 = session.decode(int(ids[4]))
    assert np.max(np.abs(step3 - full[3])) < 1e-4
    assert np.max(np.abs(step4 - full[4])) < 1e-4


def test_profile_reports_llama_bench_metric_names(tiny_bundle):
    prof = edgelm.load(tiny_bundle).profile(max_new_tokens=6, repeats=2)
    assert prof.new_tokens == 6 and prof.repeats == 2
    assert prof.decode_tok_s_min <= prof.decode_tok_s <= prof.decode_tok_s_max
    assert set(prof.to_dict()["metrics"]) == {f"pp{prof.prompt_tokens}", "tg6"}
    assert prof.device["cores"] >= 1 and prof.device["machine"]


def test_sha256_mismatch_is_refused_before_loading(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    weights = copy / "reference" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 does not match"):
        edgelm.load(copy)


def test_manifest_schema_rejects_missing_fields_and_bad_hashes(tiny_bundle):
    data = json.loads((tiny_bundle / MANIFEST).read_text())
    validate_manifest(data)
    with pytest.raises(BundleError, match="artifacts"):
        validate_manifest({k: v for k, v in data.items() if k != "artifacts"})
    bad = json.loads(json.dumps(data))
    bad["artifacts"][0]["sha256"] = "xyz"
    with pytest.raises(BundleError, match="artifacts/0/sha256"):
        validate_manifest(bad)


def test_unknown_device_lists_the_available_ones(tiny_bundle):
    with pytest.raises(DeviceError, match="available: cpu"):
        edgelm.load(tiny_bundle, device="npu")


def test_unknown_artifact_name_lists_what_the_bundle_has(tiny_bundle):
    with pytest.raises(BundleError, match="reference-fp32"):
        edgelm.load(tiny_bundle, format="onnx-fp16")  # not a recipe the android preset exports


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_other_decoder_architectures_export_and_pass_parity(tiny_model_factory, tmp_path, kind):
    options = fast_export_options(profile=False)
    manifest = export_bundle(tiny_model_factory(kind), tmp_path / kind, options)
    assert manifest.source["model_type"] in ("qwen2", "gemma3_text")
    assert all(a.parity["passed"] for a in manifest.artifacts)


def test_failed_parity_gate_writes_nothing(tiny_llama, tmp_path):
    from edgelm.errors import ParityError

    # a negative gate cannot be met: the pipeline must refuse and leave no bundle behind (one float
    # artifact is enough: quantized ones would first climb their whole recipe ladder, for minutes)
    options = fast_export_options(profile=False, gates={"fp32": -1.0}, formats=("gguf",), quants=("fp32",))
    with pytest.raises(ParityError, match="allow-drift"):
        export_bundle(tiny_llama, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    options.allow_drift = True
    assert not export_bundle(tiny_llama, tmp_path / "out", options).artifacts[0].parity["passed"]


def test_import_edgelm_does_not_import_torch_or_transformers():
    code = "import sys, edgelm, edgelm.api, edgelm.cli; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
