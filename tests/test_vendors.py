"""Every decoder artifact runs in its format's own LLM runtime, unmodified, to edgelm's text.

The tiny models here are "lively" (initializer range 0.2: the greedy continuation changes from
token to token, where a default random model repeats one token) and use an ASCII-only byte-level
vocabulary (ExecuTorch's Python binding hands each token's text to a callback as a str, which
fails on a lone byte of a multi-byte character).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import fast_export_options
from tiny_models import build_tiny_model

from edgelm.vendors.check import shown

FORMATS = ("onnx", "gguf", "executorch", "tflite")
RUNTIMES = {
    "onnx": "onnxruntime-genai Generator",
    "gguf": "llama.cpp Llama.generate",
    "executorch": "executorch TextLLMRunner",
    "tflite": "LiteRT-LM Engine",
}


def _lively(kind: str, tmp_path_factory) -> Path:
    return build_tiny_model(kind, tmp_path_factory.mktemp(f"lively-{kind}"), initializer_range=0.2, ascii_vocab=True)


class _Bundles(dict):
    """Exported on first use: Llama with the quantized recipes of the android preset, Gemma3
    (sliding windows, its own norms) in fp32."""

    QUANTS: ClassVar[dict[str, tuple[str, ...]]] = {"llama": ("int8", "int4"), "gemma3": ("fp32",)}

    def __init__(self, factory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, kind: str) -> Path:
        from edgelm.export import export_bundle

        out = self.factory.mktemp("vendor-bundles") / kind
        export_bundle(_lively(kind, self.factory), out, fast_export_options(formats=FORMATS, quants=self.QUANTS[kind]))
        self[kind] = out
        return out


@pytest.fixture(scope="module")
def vendor_bundles(tmp_path_factory) -> _Bundles:
    return _Bundles(tmp_path_factory)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_every_decoder_artifact_runs_in_its_vendor_runtime_to_edgelms_text(vendor_bundles, kind):
    manifest = json.loads((vendor_bundles[kind] / "manifest.json").read_text())
    checked = {a["name"]: a["vendor_runtimes"] for a in manifest["artifacts"] if a["format"] in FORMATS}
    assert len(checked) == len(FORMATS) * (2 if kind == "llama" else 1)
    for name, rows in checked.items():
        assert len(rows) == 1, name
        row = rows[0]
        assert row["runtime"] == RUNTIMES[name.split("-")[0]]
        assert row["result"] == "passed", (name, row["result"])
        assert row["version"], name
        # ExecuTorch's tokenizer does not print control characters (a random model's byte tokens
        # \x0e, \x12 …); the check compares what a user would see, and so does this
        text = shown(row["edgelm_text"])
        assert shown(row["vendor_text"]) == text, name
        # a continuation that says something: long, and not one token repeated (a default tiny model's "rrrr…")
        assert len(text) >= 64 and len(set(text)) >= 6, (name, text)


def test_the_reference_artifact_has_no_vendor_runtime(vendor_bundles):
    manifest = json.loads((vendor_bundles["llama"] / "manifest.json").read_text())
    reference = next(a for a in manifest["artifacts"] if a["format"] == "safetensors")
    assert reference["vendor_runtimes"] == []


def test_onnx_artifacts_carry_the_genai_config_and_tokenizer_listed_in_the_manifest(vendor_bundles):
    import edgelm

    bundle = vendor_bundles["llama"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    for artifact in (a for a in manifest["artifacts"] if a["format"] == "onnx"):
        folder = Path(artifact["path"]).parent.as_posix()
        files = artifact["vendor_runtimes"][0]["files"]
        assert sorted(files) == sorted(
            f"{folder}/{n}" for n in ("genai_config.json", "tokenizer.json", "tokenizer_config.json")
        )
        assert all(f in manifest["files"] for f in files)  # hashed like every other file
        config = json.loads((bundle / folder / "genai_config.json").read_text())
        assert config["model"]["decoder"]["filename"] == Path(artifact["path"]).name
        assert config["search"]["past_present_share_buffer"] is True
    lm = edgelm.load(bundle, format="onnx-int4")  # edgelm's own runtime still opens the same file
    assert lm.generate("The class", max_new_tokens=4, temperature=0.0)


def test_tflite_artifacts_carry_a_litertlm_that_holds_the_very_file(vendor_bundles):
    """The .litertlm beside each .tflite packs the same bytes (no second conversion), is listed and
    hashed in the manifest, and edgelm's own runtime still opens the .tflite."""
    import edgelm

    bundle = vendor_bundles["llama"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    for artifact in (a for a in manifest["artifacts"] if a["format"] == "tflite"):
        path = Path(artifact["path"])
        files = artifact["vendor_runtimes"][0]["files"]
        assert files == [path.with_suffix(".litertlm").as_posix()]
        assert files[0] in manifest["files"]
        assert (bundle / path).read_bytes() in (bundle / files[0]).read_bytes()
    lm = edgelm.load(bundle, format="tflite-int8")
    assert lm.generate("The class", max_new_tokens=4, temperature=0.0)


def test_the_pte_carries_the_llm_runner_constant_methods(vendor_bundles):
    from executorch.runtime import Runtime

    from edgelm.vendors.executorch_runner import runner_methods

    bundle = vendor_bundles["llama"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    pte = next(a for a in manifest["artifacts"] if a["format"] == "executorch")
    program = Runtime.get().load_program(str(bundle / pte["path"]))
    expected = runner_methods(512, None, (2,))
    assert set(expected) <= set(program.method_names)
    assert int(program.load_method("get_max_seq_len").execute([])[0]) == 512
    assert bool(program.load_method("enable_dynamic_shape").execute([])[0]) is True


def test_a_runtime_that_is_not_installed_is_skipped_with_its_reason(monkeypatch, tmp_path, tiny_llama):
    from edgelm.export import export_bundle
    from edgelm.vendors import llamacpp

    monkeypatch.setattr(llamacpp.VENDOR, "import_names", ("no_such_llama_binding",))
    manifest = export_bundle(
        tiny_llama, tmp_path / "b", fast_export_options(formats=("gguf",), quants=("fp32",), profile=False)
    )
    row = next(a for a in manifest.artifacts if a.format == "gguf").vendor_runtimes[0]
    assert row["result"].startswith("skipped: llama_cpp_python is not installed")


def _refused(monkeypatch):
    """onnxruntime-genai given a config that names an input the graph does not have."""
    from edgelm.vendors import onnxruntime_genai

    real = onnxruntime_genai.genai_config

    def wrong_names(model_file, facts):
        config = real(model_file, facts)
        config["model"]["decoder"]["inputs"]["past_key_names"] = "past_key_values.%d.key"
        return config

    monkeypatch.setattr(onnxruntime_genai, "genai_config", wrong_names)


def test_a_vendor_refusal_fails_the_export_with_the_runtimes_message(monkeypatch, tmp_path, tiny_llama):
    from edgelm.errors import VendorMismatchError
    from edgelm.export import export_bundle

    _refused(monkeypatch)
    options = fast_export_options(formats=("onnx",), quants=("fp32",), profile=False)
    with pytest.raises(VendorMismatchError, match="onnx-fp32: onnxruntime-genai Generator refused the file") as err:
        export_bundle(tiny_llama, tmp_path / "b", options)
    assert err.value.exit_code == 1
    assert "Missing Input: past_key_0" in str(err.value)  # the runtime's own words
    assert "\n" not in str(err.value)
    assert not (tmp_path / "b").exists()


def test_allow_vendor_mismatch_keeps_the_artifact_with_the_verdict(monkeypatch, tmp_path, tiny_llama):
    from edgelm.export import export_bundle

    _refused(monkeypatch)
    options = fast_export_options(formats=("onnx",), quants=("fp32",), profile=False, allow_vendor_mismatch=True)
    manifest = export_bundle(tiny_llama, tmp_path / "b", options)
    row = next(a for a in manifest.artifacts if a.format == "onnx").vendor_runtimes[0]
    assert row["result"].startswith("failed: onnxruntime-genai Generator refused the file")
    assert "Vendor runtimes" in (tmp_path / "b" / "report" / "report.md").read_text()


def test_a_vendor_file_path_that_leaves_the_bundle_is_refused(tiny_bundle):
    from edgelm.bundle import MANIFEST, validate_manifest
    from edgelm.errors import BundleError

    data = json.loads((tiny_bundle / MANIFEST).read_text())
    data["artifacts"][0]["vendor_runtimes"] = [
        {"runtime": "x", "package": "x", "result": "passed", "files": ["../outside.json"]}
    ]
    with pytest.raises(BundleError, match="vendor runtime file"):
        validate_manifest(data)


def test_run_with_the_vendor_runtime_streams_the_same_text_as_edgelm(vendor_bundles):
    from test_cli import run_cli

    bundle = str(vendor_bundles["llama"])
    common = (
        "run",
        bundle,
        "--format",
        "gguf-int8",
        "--prompt",
        "The class statement",
        "--no-chat",
        "--max-new-tokens",
        "24",
    )
    vendor = run_cli(*common, "--runtime", "vendor")
    ours = run_cli(*common, "--temperature", "0", "--repetition-penalty", "1")
    assert vendor.returncode == 0 and ours.returncode == 0, vendor.stderr + ours.stderr
    assert vendor.stdout == ours.stdout and len(vendor.stdout.strip()) > 10


def test_profile_shows_vendor_and_edgelm_decode_side_by_side(vendor_bundles, tmp_path):
    from test_cli import run_cli

    out = tmp_path / "p.json"
    result = run_cli(
        "profile",
        str(vendor_bundles["llama"]),
        "--runtime",
        "both",
        "--new-tokens",
        "16",
        "--repeats",
        "2",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert set(rows) == {f"{fmt}-{q}" for fmt in FORMATS for q in ("int8", "int4")}
    for name, row in rows.items():
        assert row["vendor_decode_tok_s"] > 0 and row["edgelm_decode_tok_s"] > 0, name
        assert len(row["vendor"]) == len(row["edgelm"]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (("--format", "reference-fp32"), "no vendor LLM runtime for safetensors"),
        (("--format", "onnx-int8", "--temperature", "0.7"), "greedy loop"),
        (("--runtime", "someone"), "--runtime 'someone'"),
    ],
)
def test_run_with_a_vendor_runtime_refuses_what_it_cannot_do(vendor_bundles, args, message):
    from test_cli import run_cli

    result = run_cli("run", str(vendor_bundles["llama"]), "--prompt", "Hi", "--runtime", "vendor", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_litertlm_metadata_has_the_start_token_only_where_the_tokenizer_adds_one(tmp_path):
    pytest.importorskip("litert_lm_builder", reason="litert-lm-builder is not installed")
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    from edgelm.vendors import GenerationFacts
    from edgelm.vendors.litert_lm import llm_metadata

    facts = GenerationFacts(
        tokenizer_dir=tmp_path, eos_ids=(2, 7), bos_id=None, max_context=512, vocab_size=384, chat_template="{{x}}"
    )
    parsed = llm_metadata_pb2.LlmMetadata.FromString(llm_metadata(facts))
    assert not parsed.HasField("start_token")
    assert [list(t.token_ids.ids) for t in parsed.stop_tokens] == [[2], [7]]
    assert (parsed.max_num_tokens, parsed.kv_cache_init_value, parsed.jinja_prompt_template) == (512, 0, "{{x}}")
    with_bos = llm_metadata_pb2.LlmMetadata.FromString(llm_metadata(GenerationFacts(**{**facts.__dict__, "bos_id": 1})))
    assert list(with_bos.start_token.token_ids.ids) == [1]


def test_the_litertlm_chat_template_reads_content_as_a_string_or_as_litert_lms_parts():
    """LiteRT-LM's conversation passes [{"type": "text", "text": ...}] where HF templates expect a
    string: the packed template renders both to the model's own prompt."""
    import jinja2

    from edgelm.vendors.litert_lm import chat_template

    hf = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    env = jinja2.Environment()
    plain = env.from_string(hf).render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    packed = env.from_string(chat_template(hf))
    assert packed.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True) == plain
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert packed.render(messages=parts, add_generation_prompt=True) == plain
