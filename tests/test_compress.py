"""Compression on tiny random models: corpus cleaning, layer reduction, pruning, distillation
(resume, two processes), budget search, the CLI, and export of a compressed model to every format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fast_export_options
from test_cli import _assert_bad_input, run_cli
from tiny_models import build_tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasketch", reason="the compress extra is not installed (pip install 'edgelm[compress]')")

from edgelm.compress.corpus import (  # noqa: E402
    CorpusSettings,
    build_corpus,
    deduplicate,
    strip_markup,
)
from edgelm.compress.distill import DistillSettings, distill  # noqa: E402
from edgelm.compress.layers import choose_layers_to_drop, drop_layers, keeping_layers  # noqa: E402
from edgelm.compress.measure import mean_nll, windows  # noqa: E402
from edgelm.compress.pipeline import TextSplits, compress_model  # noqa: E402
from edgelm.compress.prune import prunable_linears, prune, sparsity_of  # noqa: E402
from edgelm.compress.recipe import CompressionRecord, CompressRecipe, LayerDrop, Prune  # noqa: E402
from edgelm.errors import EdgeLMError, UnsupportedError  # noqa: E402
from edgelm.parity import parity_text  # noqa: E402
from edgelm.tokenizer import Tokenizer  # noqa: E402

FAST = dict(calibration_tokens=512, calibration_window=128, eval_tokens=2048, eval_window=256)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Six-layer tiny models, so there are layers to drop."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny_model(kind, tmp_path_factory.mktemp(f"deep-{kind}"), layers=6)
        return cache[kind]

    return make


def _load(folder: Path, cls: str = "AutoModelForCausalLM"):
    return getattr(transformers, cls).from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text(deep) -> TextSplits:
    return TextSplits.build(Tokenizer(deep("llama")))


# --- corpus -------------------------------------------------------------------------------


def test_corpus_excludes_parity_text_and_splits_disjointly():
    corpus = build_corpus()
    parity_paragraphs = [p.strip() for p in strip_markup(parity_text()).split("\n\n") if len(p.strip()) > 120]
    everything = "\n".join(corpus.train + corpus.heldout)
    assert parity_paragraphs and not any(p in everything for p in parity_paragraphs)
    assert corpus.train and corpus.heldout and not set(corpus.train) & set(corpus.heldout)
    assert 0.05 < len(corpus.heldout) / (len(corpus.train) + len(corpus.heldout)) < 0.2
    assert build_corpus().heldout == corpus.heldout  # deterministic
    assert all(len(block) >= CorpusSettings().min_chars for block in corpus.train)


def test_cleaning_strips_markup_and_removes_exact_and_near_duplicates():
    assert (
        strip_markup("Use :func:`os.path.join <join>` and ``x + 1`` &amp; <b>bold</b>\n\n\n\nnext")
        == "Use os.path.join and x + 1 & bold\n\nnext"
    )
    base = " ".join(f"word{i}" for i in range(80))
    near = base.replace("word40", "changed")
    kept, exact, near_dropped = deduplicate([base, base.upper(), near, "something else entirely " * 10], 0.8)
    assert kept == [base, "something else entirely " * 10] and exact == 1 and near_dropped == 1


# --- layer reduction ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_dropped_layers_save_and_reload_with_the_same_logits(deep, tmp_path, kind):
    model = _load(deep(kind))
    ids = torch.tensor([list(range(3, 40))])
    with keeping_layers(model, [0, 2, 3, 5]):
        expected = model(input_ids=ids).logits
    per_layer = list(getattr(model.config, "layer_types", None) or [])
    kept = drop_layers(model, [1, 4])
    assert kept == [0, 2, 3, 5] and model.config.num_hidden_layers == 4
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    reloaded = _load(tmp_path)
    assert reloaded.config.num_hidden_layers == 4
    if per_layer:
        assert reloaded.config.layer_types == [per_layer[i] for i in kept]
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_layer_choice_is_measured(deep, text):
    model = _load(deep("llama"))
    calibration = windows(text.train, 128, 512)
    dropped, info = choose_layers_to_drop(model, 2, "loss", calibration, mean_nll)
    assert len(dropped) == 2 and len(info["rounds"]) == 2
    first = info["rounds"][0]["loss_increase"]
    assert info["rounds"][0]["dropped"] == min(first, key=first.get)  # the cheapest layer went first
    cosine, scores = choose_layers_to_drop(model, 2, "cosine", calibration, mean_nll)
    order = sorted(range(6), key=lambda i: scores["block_influence"][i])
    assert cosine == sorted(order[:2]) and all(s >= 0 for s in scores["block_influence"])
    assert choose_layers_to_drop(model, 2, "last", calibration, mean_nll)[0] == [4, 5]
    with pytest.raises(UnsupportedError, match="cannot drop 6 of 6"):
        choose_layers_to_drop(model, 6, "loss", calibration, mean_nll)


# --- pruning ------------------------------------------------------------------------------


@pytest.mark.parametrize("method,target", [("l1", 0.6), ("l1-layer", 0.3), ("2:4", 0.5)])
def test_unstructured_pruning_reaches_its_sparsity(deep, text, method, target):
    model = _load(deep("llama"))
    masks, change = prune(model, method, target, windows(text.train, 128, 256))
    assert abs(sparsity_of(model) - target) < 0.01 and change["shrinks_files"] is False
    if method == "l1-layer":
        for _, linear in prunable_linears(model):
            assert abs(float((linear.weight == 0).float().mean()) - target) < 0.02
    if method == "2:4":
        for _, linear in prunable_linears(model):
            groups = (linear.weight != 0).reshape(linear.weight.shape[0], -1, 4).sum(-1)
            assert bool((groups <= 2).all())
    assert set(masks) == {f"{name}.weight" for name, _ in prunable_linears(model)}


@pytest.mark.parametrize(
    "kind,method", [("llama", "heads"), ("gemma3", "heads"), ("qwen2", "channels"), ("llama", "channels")]
)
def test_structured_pruning_shrinks_matrices_and_reloads(deep, text, tmp_path, kind, method):
    model = _load(deep(kind))
    before = sum(p.numel() for p in model.parameters())
    prune(model, method, 0.5, windows(text.train, 128, 256))
    assert sum(p.numel() for p in model.parameters()) < before
    layer = model.model.layers[0]
    if method == "heads":
        assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
        assert layer.self_attn.q_proj.out_features == 2 * model.config.head_dim
        assert layer.self_attn.k_proj.out_features == model.config.head_dim
    else:
        assert model.config.intermediate_size == 32 and layer.mlp.down_proj.in_features == 32
    ids = torch.tensor([list(range(3, 40))])
    expected = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    torch.testing.assert_close(_load(tmp_path)(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_encoder_channels_prune_and_heads_are_refused(deep, tmp_path_factory):
    folder = build_tiny_model("bert", tmp_path_factory.mktemp("bert4"), layers=4)
    model = _load(folder, "AutoModel")
    batches = [torch.tensor([list(range(3, 60))])]
    prune(model, "channels", 0.5, batches)
    assert model.config.intermediate_size == 32 and model.encoder.layer[0].intermediate.dense.out_features == 32
    model(input_ids=batches[0])
    with pytest.raises(UnsupportedError, match="separate q/k/v/o"):
        prune(model, "heads", 0.5, batches)


# --- distillation -------------------------------------------------------------------------


def _student(deep, kind="llama"):
    teacher = _load(deep(kind))
    student = _load(deep(kind))
    kept = drop_layers(student, [1, 4])
    return teacher, student, kept


SMALL = dict(batch_size=4, seq_len=64, lr=1e-3, warmup_steps=2, precision="fp32")


def test_distillation_lowers_the_loss_and_keeps_pruned_zeros(deep, text):
    teacher, student, kept = _student(deep)
    masks, _ = prune(student, "l1", 0.5, windows(text.train, 64, 256))
    result = distill(
        teacher, student, text.train, DistillSettings(steps=20, hidden_weight=0.1, **SMALL), masks=masks, layer_map=kept
    )
    assert len(result.losses) == 20 and result.tokens == 20 * 4 * 64
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert abs(sparsity_of(student) - 0.5) < 0.01  # training did not refill the pruned weights


def test_resume_after_interrupt_equals_an_uninterrupted_run(deep, text, tmp_path):
    settings = DistillSettings(steps=6, checkpoint_every=2, **SMALL)
    teacher, whole, _ = _student(deep)
    full = distill(teacher, whole, text.train, settings, tmp_path / "a")

    class Interrupted(Exception):
        pass

    def stop_at_5(step: int, loss: float, tps: float) -> None:
        if step == 5:
            raise Interrupted  # after the step-4 checkpoint, before the step-6 one

    _, first_try, _ = _student(deep)
    with pytest.raises(Interrupted):
        distill(teacher, first_try, text.train, settings, tmp_path / "b", on_step=stop_at_5)
    _, resumed_model, _ = _student(deep)  # a fresh process would start from the saved student
    resumed = distill(teacher, resumed_model, text.train, settings, tmp_path / "b")
    assert resumed.resumed_from_step == 4
    assert resumed.losses == full.losses
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(EdgeLMError, match="other distillation settings"):
        distill(
            teacher, resumed_model, text.train, DistillSettings(steps=8, checkpoint_every=2, **SMALL), tmp_path / "b"
        )


def test_two_processes_follow_the_single_process_loss_curve(deep, tmp_path):
    student = tmp_path / "student"
    compress_model(deep("llama"), student, CompressRecipe(drop_layers=LayerDrop(2, "last"), **FAST))
    args = [
        "--teacher",
        str(deep("llama")),
        "--student",
        str(student),
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--precision",
        "fp32",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "edgelm.compress.distill", *args, "-o", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "edgelm.compress.distill",
            *args,
            "-o",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    runs = [json.loads((tmp_path / name / "compression.json").read_text())["steps"][-1] for name in ("one", "two")]
    assert [r["world_size"] for r in runs] == [1, 2]
    assert runs[0]["losses"] == pytest.approx(runs[1]["losses"], rel=1e-4)
    assert _load(tmp_path / "two").config.num_hidden_layers == 4


def test_distill_entry_point_reports_bad_input_on_one_line(deep, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgelm.compress.distill",
            "--teacher",
            str(deep("llama")),
            "--student",
            str(tmp_path / "missing"),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("edgelm.compress.distill: error:")
    assert "no such file or folder" in result.stderr and not (tmp_path / "out").exists()


# --- the pipeline, recipes, export --------------------------------------------------------


def test_compress_writes_a_loadable_folder_with_its_record(deep, tmp_path):
    out = tmp_path / "small"
    recipe = CompressRecipe(
        drop_layers=LayerDrop(2),
        prune=Prune("channels", 0.5),
        distill=DistillSettings(steps=3, **SMALL),
        teacher_continuations=2,
        **FAST,
    )
    record = compress_model(deep("qwen2"), out, recipe)
    assert 0 < record.corpus["teacher_generated_tokens"] <= 2 * 96
    assert set(record.perplexity) == {"base", "after_drop_layers", "after_prune", "after_distill"}
    assert record.parameters["after"] < record.parameters["before"]
    assert [s["step"] for s in record.steps] == ["drop_layers", "prune", "distill"]
    assert record.corpus["train_tokens"] > 10_000 and record.corpus["heldout_tokens"] > 1000
    model = _load(out)
    assert model.config.num_hidden_layers == 4 and model.config.intermediate_size == 32
    assert (out / "tokenizer.json").is_file() and not out.with_name("small.checkpoints").exists()
    again = CompressRecipe.load(out / "compression.json")  # a record works as a recipe
    assert again.to_dict() == recipe.to_dict()
    assert CompressionRecord.read(out).kept_layers == record.kept_layers


def test_recipe_errors_are_edgelm_errors(tmp_path):
    with pytest.raises(UnsupportedError, match="does nothing"):
        CompressRecipe()
    with pytest.raises(UnsupportedError, match="unknown recipe keys"):
        CompressRecipe.from_dict({"drop": 2})
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(EdgeLMError, match="not a JSON recipe"):
        CompressRecipe.load(bad)


def test_cli_compress_and_its_errors(deep, tmp_path):
    out = tmp_path / "cli"
    result = run_cli("compress", str(deep("llama")), "-o", str(out), "--prune", "2:4")
    assert result.returncode == 0, result.stderr
    assert "files do not get smaller" in result.stdout and (out / "compression.json").is_file()
    _assert_bad_input(
        run_cli("compress", str(deep("llama")), "-o", str(tmp_path / "x"), "--prune", "bogus"), "unknown pruning method"
    )
    _assert_bad_input(run_cli("compress", str(deep("llama")), "-o", str(tmp_path / "x")), "does nothing")
    _assert_bad_input(run_cli("compress", str(deep("llama")), "-o", str(out), "--drop-layers", "1"), "exists")
    assert not (tmp_path / "x").exists()


def test_budget_search_picks_the_smallest_candidate_that_fits(deep, tmp_path):
    from edgelm.compress.budget import SearchSpace, search_budget

    options = fast_export_options(formats=("onnx",), quants=("fp32", "int8"))
    result = search_budget(
        deep("llama"),
        tmp_path / "b",
        max_mb=10.0,
        max_ppl_ratio=1.5,
        export_options=options,
        space=SearchSpace(layers_dropped=(0, 2)),
    )
    assert len(result.candidates) == 4  # 2 recipes x 2 quants, all measured
    fitting = [c for c in result.candidates if c.meets_budget]
    assert result.chosen is min(fitting, key=lambda c: (c.megabytes, c.ppl_ratio))
    assert any(c.pareto for c in result.candidates) and result.chosen.pareto
    base = [c for c in result.candidates if c.layers_dropped == 0 and c.artifact == "onnx-fp32"][0]
    assert base.ppl_ratio == pytest.approx(1.0, abs=1e-3)
    written = json.loads((tmp_path / "b" / "budget.json").read_text())
    assert written["chosen"]["artifact"] == result.chosen.artifact
    if result.chosen.layers_dropped:
        assert _load(tmp_path / "b").config.num_hidden_layers == 6 - result.chosen.layers_dropped
    none_fit = search_budget(
        deep("llama"),
        tmp_path / "c",
        max_mb=0.001,
        max_ppl_ratio=1.0,
        export_options=options,
        space=SearchSpace(layers_dropped=(0,)),
    )
    assert none_fit.chosen is None and (tmp_path / "c" / "budget.json").is_file()


def test_compressed_model_exports_to_every_installed_format(deep, tmp_path):
    import edgelm
    from edgelm.bundle import read_bundle
    from edgelm.export import export_bundle
    from edgelm.exporter import EXPORTER_MODULES, get_exporter, missing_requirements

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"drop_layers": {"count": 2}, "prune": {"method": "heads", "sparsity": 0.5}, **FAST}))
    formats = tuple(f for f in EXPORTER_MODULES if f != "safetensors" and not missing_requirements(get_exporter(f)))
    out = tmp_path / "bundle"
    export_bundle(deep("llama"), out, fast_export_options(formats=formats, quants=("fp32",), compress=recipe))
    manifest = read_bundle(out)
    assert manifest.compression["base_model"] == deep("llama").name
    assert manifest.compression["perplexity"]["base"] > 0
    assert {a.format for a in manifest.artifacts} == {"safetensors", *formats}
    for artifact in manifest.artifacts:
        assert artifact.parity["passed"], artifact.name
        lm = edgelm.load(out, format=artifact.name)
        assert isinstance(lm.generate("The", max_new_tokens=4), str)
        lm.close()
    assert "base_model_relation: finetune" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".bundle.compress-*"))
