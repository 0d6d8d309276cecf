"""BERT-style encoders: the encoder graph, ONNX export for embeddings and classification,
parity against torch, the TextEncoder API, encoder profiles and the CLI on an encoder bundle."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import fast_export_options

import edgelm
from edgelm.api import TextEncoder
from edgelm.encoder_eval import encoder_texts, pad_batch
from edgelm.errors import UnsupportedError
from edgelm.export import export_bundle

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
ALL_QUANTS = ("fp32", "fp16", "int8", "int4")


@pytest.fixture(scope="module")
def embedding_bundle(tiny_model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder") / "bert"
    export_bundle(tiny_model_factory("bert"), out, fast_export_options(formats=("onnx",), quants=ALL_QUANTS))
    return out


@pytest.fixture(scope="module")
def classifier_bundle(tiny_model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder") / "bert-cls"
    export_bundle(tiny_model_factory("bert-cls"), out, fast_export_options(formats=("onnx",), quants=("fp32", "int8")))
    return out


def _torch_outputs(folder, task, ids, mask):
    import torch
    import transformers

    from edgelm.architectures import TASK_MODEL_CLASSES

    model = getattr(transformers, TASK_MODEL_CLASSES[task]).from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    if task == "text-classification":
        return out.logits.numpy()
    hidden, weights = out.last_hidden_state.numpy(), mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(1) / weights.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def _padded_real_batch(bundle, count=8):
    encoder = edgelm.load(bundle, format="onnx-fp32")
    rows = [encoder.tokenizer.encode(t)[:100] for t in encoder_texts(count)]
    return pad_batch(rows)


@pytest.mark.parametrize(
    ("kind", "task", "bundle"),
    [("bert", "feature-extraction", "embedding_bundle"), ("bert-cls", "text-classification", "classifier_bundle")],
)
def test_onnx_encoder_matches_transformers_within_1e_4(tiny_model_factory, request, kind, task, bundle):
    """Checked against transformers' own model (pooling done here independently), on a padded batch."""
    bundle = request.getfixturevalue(bundle)
    ids, mask = _padded_real_batch(bundle)
    assert mask.min() == 0, "the batch must contain padding for the mask to be exercised"
    expected = _torch_outputs(tiny_model_factory(kind), task, ids, mask)
    got = edgelm.load(bundle, format="onnx-fp32").session().run(ids, mask)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_every_quant_recipe_passes_the_cosine_gate_and_is_reported(embedding_bundle):
    from edgelm.bundle import read_bundle

    manifest = read_bundle(embedding_bundle)
    assert manifest.source["task"] == "feature-extraction"
    onnx = {a.quant: a for a in manifest.artifacts if a.format == "onnx"}
    assert set(onnx) == set(ALL_QUANTS)
    for quant, entry in onnx.items():
        assert entry.parity["passed"] and entry.parity["min_cosine"] >= entry.parity["gate"], quant
        assert entry.signature["kind"] == "encoder" and entry.signature["outputs"] == ["embeddings"]
        profile = entry.profile
        assert profile["sequence_length"] == 128 and profile["batch"] == 8
        assert 0 < profile["latency_p50_ms"] <= profile["latency_p90_ms"]
        assert profile["throughput_per_s"] > 0 and profile["peak_rss_mb"] > 0
        assert profile["file_bytes"] == entry.bytes
    assert onnx["fp32"].parity["max_abs_diff"] <= 1e-4
    report = (embedding_bundle / "report" / "report.md").read_text()
    assert "min cosine" in report and "p50 ms @128" in report and "batch-8 inputs/s" in report
    assert (embedding_bundle / "report" / "plots" / "throughput_per_s.png").is_file()
    assert "pipeline_tag: feature-extraction" in (embedding_bundle / "README.md").read_text()


def test_text_encoder_embeds_normalized_vectors_that_rank_paraphrases_consistently(embedding_bundle):
    encoder = edgelm.load(embedding_bundle, format="onnx-int8")
    assert isinstance(encoder, TextEncoder)
    texts = encoder_texts(3)
    vectors = encoder.embed(texts)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    # a batch gives what one text at a time gives (padding does not leak into the pooling)
    one_by_one = np.concatenate([encoder.embed(t) for t in texts])
    assert np.abs(one_by_one - vectors).max() < 1e-4
    reference = edgelm.load(embedding_bundle, format="reference-fp32").embed(texts)
    assert np.abs(reference - vectors).max() < 0.05
    with pytest.raises(UnsupportedError, match="classify"):
        encoder.classify("a text")


def test_classifier_returns_label_probabilities_matching_the_reference(classifier_bundle):
    onnx = edgelm.load(classifier_bundle, format="onnx-fp32")
    reference = edgelm.load(classifier_bundle, format="reference-fp32")
    assert onnx.labels == ["negative", "neutral", "positive"]
    texts = encoder_texts(4)
    ours, theirs = onnx.classify(texts), reference.classify(texts)
    for a, b in zip(ours, theirs):
        assert set(a) == {"negative", "neutral", "positive"} and abs(sum(a.values()) - 1) < 1e-6
        assert list(a) == list(b)  # same ranking
        assert max(abs(a[k] - b[k]) for k in a) < 1e-5
    with pytest.raises(UnsupportedError, match="embed"):
        onnx.embed("a text")
    entry = onnx.artifact
    assert entry.parity["label_agreement"] == 1.0 and entry.signature["outputs"] == ["logits"]


def test_encoder_profile_through_the_api(embedding_bundle):
    profile = edgelm.load(embedding_bundle, format="onnx-fp32").profile(runs=5)
    assert profile.sequence_length == 128 and profile.latency_p50_ms > 0 and profile.throughput_per_s > 0


def test_cli_run_and_profile_on_an_encoder_bundle(embedding_bundle, classifier_bundle, tmp_path):
    cli = [sys.executable, "-m", "edgelm"]
    out = subprocess.run(
        [*cli, "run", str(embedding_bundle), "-f", "onnx-fp32", "-p", "hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "embedding: 32 dims, L2 norm 1.0000" in out.stdout
    out = subprocess.run(
        [*cli, "run", str(classifier_bundle), "-p", "hello"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "positive" in out.stdout and "negative" in out.stdout, out.stderr
    result = tmp_path / "profile.json"
    out = subprocess.run(
        [*cli, "profile", str(embedding_bundle), "-f", "onnx-int4", "--json", str(result)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "batch-8 inputs/s" in out.stdout
    assert '"throughput_per_s"' in result.read_text()


def test_a_format_that_cannot_export_encoders_is_skipped_from_a_preset_but_refused_when_asked(monkeypatch):
    import edgelm.export as export_module
    from edgelm.export import ExportOptions, plan_artifacts
    from edgelm.exporter import Exporter

    real = export_module.get_exporter

    class DecoderOnly(Exporter):  # an exporter whose format has no encoder path
        format = "onnx"
        runtime = "onnxruntime"
        quants = ("fp32",)
        tasks = ("text-generation",)
        requires = ()

    monkeypatch.setattr(export_module, "get_exporter", lambda fmt: DecoderOnly() if fmt == "onnx" else real(fmt))
    plan, skipped = plan_artifacts(ExportOptions(target="android"), "feature-extraction")
    assert plan[0] == ("safetensors", "fp32") and all(fmt != "onnx" for fmt, _ in plan)
    assert "does not handle feature-extraction" in skipped["onnx"]
    with pytest.raises(UnsupportedError, match="does not handle feature-extraction"):
        plan_artifacts(ExportOptions(formats=("onnx",)), "feature-extraction")
