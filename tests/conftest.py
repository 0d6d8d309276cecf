from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build (once per session) a tiny random model folder of a given kind."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llama, tmp_path_factory) -> Path:
    """A bundle exported from the tiny Llama (small parity windows, short profile)."""
    from edgelm.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-llama"
    export_bundle(tiny_llama, out, fast_export_options())
    return out


def fast_export_options(**overrides):
    from edgelm.export import ExportOptions
    from edgelm.parity import ParitySettings

    defaults = dict(
        parity=ParitySettings(max_tokens=256, window=64, stride=64), profile_new_tokens=8, profile_repeats=1
    )
    return ExportOptions(**{**defaults, **overrides})


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first: with `-n 2 --dist loadfile` (the README's test command)
    the longest file starts at once on one worker while the other takes everything else, so
    both finish at about the same time instead of the export starting last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: order kept otherwise
