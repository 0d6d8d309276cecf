"""Property-based checks (hypothesis, 500 examples each) of every untrusted parse, and
byte-mutation fuzzing of each format parser through `inspect` and the runtimes, each case
in a child process under an address-space limit (tests/fuzzing.py).

CI runs FUZZ_CASES mutants per parser (a few minutes in all); benchmarks/fuzz_parsers.py
runs 10,000 per parser and records the counts.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelm.errors import BundleError, EdgeLMError

PROPERTY = settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
FUZZ_CASES = int(os.environ.get("EDGELM_FUZZ_CASES", "60"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(st.text(max_size=60))
def test_a_manifest_path_is_refused_or_stays_inside(tmp_path_factory, rel):
    from edgelm.bundle import check_relative_path

    root = Path("/bundle-root")
    try:
        check_relative_path(rel, "file")
    except BundleError:
        return
    resolved = Path(os.path.normpath(root / rel))
    assert root in resolved.parents and ".." not in Path(rel).parts


@PROPERTY
@given(
    st.dictionaries(
        st.sampled_from(
            ["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "ignore_eos"]
        ),
        json_values,
    )
)
def test_sampling_settings_are_valid_or_refused(data):
    from edgelm.sampling import SamplingConfig

    try:
        config = SamplingConfig.from_dict(data)
    except EdgeLMError:
        return
    assert config.temperature >= 0 and 0 < config.top_p <= 1 and all(isinstance(s, str) for s in config.stop)


@PROPERTY
@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_json_files_parse_to_an_object_or_are_refused(tmp_path_factory, data):
    from edgelm.errors import InvalidModelError
    from edgelm.model import read_json_object

    path = tmp_path_factory.getbasetemp() / "prop.json"
    path.write_bytes(data)
    try:
        assert isinstance(read_json_object(path, InvalidModelError, "x"), dict)
    except InvalidModelError:
        pass


@PROPERTY
@given(st.binary(max_size=600))
def test_gguf_headers_parse_or_are_refused(tmp_path_factory, tail):
    from edgelm.errors import InvalidModelError
    from edgelm.gguf_header import read_gguf_summary

    path = tmp_path_factory.getbasetemp() / "prop.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + tail)
    try:
        read_gguf_summary(path)
    except InvalidModelError:
        pass


@PROPERTY
@given(st.binary(max_size=600))
def test_tflite_flatbuffers_parse_or_are_refused(tmp_path_factory, tail):
    pytest.importorskip("ai_edge_litert")
    from edgelm.errors import InvalidModelError
    from edgelm.tflite_file import read_tflite

    path = tmp_path_factory.getbasetemp() / "prop.tflite"
    path.write_bytes(tail[:4] + b"TFL3" + tail[4:])
    try:
        read_tflite(path)
    except InvalidModelError:
        pass


template_parts = st.sampled_from(
    [
        "{% for i in range(",
        "100000",
        ") %}",
        "{% endfor %}",
        "{{ ",
        " }}",
        "'x'",
        " * ",
        "10",
        "9" * 12,
        " ** ",
        "messages",
        "[0]",
        "['content']",
        "|center(",
        "|format(",
        ")",
        "{% macro f() %}",
        "{{ f() }}",
        "{% endmacro %}",
        "loop.index",
        " ~ ",
        "{% if ",
        " %}",
        "{% endif %}",
        "raise_exception('x')",
        "__class__",
        ".__mro__",
        "range(10)",
        "|join",
        "|list",
        "%999999999d",
        "'",
        "(",
        "{% set x = ",
    ]
)


@PROPERTY
@given(st.lists(template_parts, max_size=14).map("".join))
def test_chat_templates_render_or_are_refused_quickly(source):
    from edgelm.errors import TokenizerError
    from edgelm.tokenizer import MAX_TEMPLATE_OUTPUT, BoundedTemplate

    try:
        text = BoundedTemplate(source).render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    except TokenizerError:
        return
    assert len(text) <= MAX_TEMPLATE_OUTPUT


@PROPERTY
@given(
    st.lists(st.sampled_from(["partial", "old", "mine", "x"]), min_size=1, max_size=4),
    st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_stale_cleaning_never_touches_live_or_foreign_folders(tmp_path_factory, kinds, alive):
    import subprocess
    import sys

    from edgelm.staging import clean_stale, owner_tag

    root = tmp_path_factory.mktemp("stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_tag = owner_tag(dead.pid)
    dead.wait()
    made = []
    for i, (kind, live) in enumerate(zip(kinds, alive)):
        folder = root / f".bundle.{kind}-{owner_tag() if live else dead_tag}-{i:08x}"
        folder.mkdir()
        made.append((folder, kind in ("partial", "old") and not live))
    (root / "bundle").mkdir()  # a bundle is there: an .old leftover is not restored over it
    clean_stale(root / "bundle")
    for folder, should_go in made:
        assert folder.exists() != should_go


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle):
    return tiny_bundle


@pytest.mark.slow
@pytest.mark.parametrize("parser", ["gguf", "onnx", "tflite", "executorch", "safetensors", "manifest"])
def test_byte_mutation_fuzz_finds_no_crash_hang_bug_or_canary(fuzz_bundle, tmp_path, parser):
    from fuzzing import fuzz_parser

    from edgelm.bundle import read_bundle

    formats = {a.format for a in read_bundle(fuzz_bundle).artifacts}
    if parser != "manifest" and parser not in formats:
        pytest.skip(f"the tiny bundle has no {parser} artifact (its exporter is not installed)")
    result = fuzz_parser(fuzz_bundle, parser, FUZZ_CASES, tmp_path, seed=1)
    assert result.cases == FUZZ_CASES
    assert result.bad == 0, json.dumps(result.to_dict(), indent=1)
