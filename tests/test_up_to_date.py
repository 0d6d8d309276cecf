"""Re-running an unchanged export keeps the bundle (edgelm.up_to_date)."""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import fast_export_options

from edgelm.errors import EdgeLMError
from edgelm.export import export_bundle

OPTIONS = {"formats": ("gguf",), "quants": ("int8",), "profile": False}


@pytest.fixture(scope="module")
def gguf_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("rerun") / "bundle"
    return out, export_bundle(tiny_llama, out, fast_export_options(**OPTIONS))


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_an_unchanged_rerun_keeps_the_bundle_in_seconds(tiny_llama, gguf_bundle):
    out, first = gguf_bundle
    assert first.export_key and len(first.export_key) == 64
    before = _mtimes(out)
    start = time.perf_counter()
    again = export_bundle(tiny_llama, out, fast_export_options(**OPTIONS))  # no --overwrite needed
    assert time.perf_counter() - start < 30
    assert again.created == first.created and again.export_key == first.export_key
    assert _mtimes(out) == before  # nothing rewritten


def test_a_changed_option_or_source_file_means_a_new_export(tiny_llama, gguf_bundle, tmp_path):
    out, first = gguf_bundle
    changed = fast_export_options(**OPTIONS, profile_repeats=2)
    with pytest.raises(EdgeLMError, match="overwrite"):  # not current: the usual rule for an existing folder
        export_bundle(tiny_llama, out, changed)
    edited = tmp_path / "model"
    shutil.copytree(tiny_llama, edited)
    config = edited / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "edited": true}', 1))
    from edgelm.model import inspect_source
    from edgelm.up_to_date import export_key

    assert export_key(inspect_source(edited), fast_export_options(**OPTIONS)) != first.export_key
    assert export_key(inspect_source(tiny_llama), changed) != first.export_key
    assert export_key(inspect_source(tiny_llama), fast_export_options(**OPTIONS, overwrite=True)) == first.export_key


def test_a_change_to_edgelms_own_code_means_a_new_export(tiny_llama, gguf_bundle, tmp_path, monkeypatch):
    """A development checkout keeps its version number across changes: the key also digests
    edgelm's source files, so a bundle made by other code is not kept."""
    from edgelm import up_to_date
    from edgelm.model import inspect_source

    package = tmp_path / "package"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "module.py").write_text("X = 1\n")
    (package / "notes.txt").write_text("not code")
    before = up_to_date.code_digest([package])
    (package / "notes.txt").write_text("still not code")
    assert up_to_date.code_digest([package]) == before
    (package / "sub" / "module.py").write_text("X = 2\n")
    assert up_to_date.code_digest([package]) != before

    _, first = gguf_bundle
    assert up_to_date.export_key(inspect_source(tiny_llama), fast_export_options(**OPTIONS)) == first.export_key
    monkeypatch.setattr(up_to_date, "edgelm_code_digest", lambda: "other code")
    assert up_to_date.export_key(inspect_source(tiny_llama), fast_export_options(**OPTIONS)) != first.export_key


def test_a_damaged_bundle_or_rebuild_is_exported_again(tiny_llama, gguf_bundle, tmp_path):
    out, first = gguf_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    artifact = copy / first.artifact("gguf").path
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"\0")
    with pytest.raises(EdgeLMError, match="overwrite"):
        export_bundle(tiny_llama, copy, fast_export_options(**OPTIONS))
    rebuilt = export_bundle(tiny_llama, copy, fast_export_options(**OPTIONS, overwrite=True))
    assert rebuilt.created >= first.created and rebuilt.artifact("gguf").sha256 == first.artifact("gguf").sha256
    forced = export_bundle(tiny_llama, copy, fast_export_options(**OPTIONS, overwrite=True, reuse=False))
    assert any(s["step"] == "Exporting gguf-int8" for s in forced.export_steps)
