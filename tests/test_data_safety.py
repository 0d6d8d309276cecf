"""Never lose a user's data: export and push replace only a complete edgelm bundle, the source
can never be the output, the swap is atomic, and staging folders of dead runs are cleaned."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fast_export_options

from edgelm.bundle import atomic_bundle_dir, is_bundle
from edgelm.devices import LocalTransport
from edgelm.errors import BundleError
from edgelm.export import export_bundle
from edgelm.push import push_bundle
from edgelm.staging import clean_stale, make_staging, move_into_place, owner_tag

EDGELM = [sys.executable, "-m", "edgelm"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELM, *args], capture_output=True, text=True, timeout=300, check=False)


def user_folder(path: Path) -> Path:
    """A folder the user owns: a file edgelm must never delete."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.txt").write_text("four years of work")
    return path


def assert_intact(path: Path) -> None:
    assert (path / "thesis.txt").read_text() == "four years of work"


@pytest.fixture(scope="module")
def small_bundle(tiny_llama, tmp_path_factory) -> Path:
    """A reference-only bundle (quick to export)."""
    out = tmp_path_factory.mktemp("safety") / "bundle"
    export_bundle(tiny_llama, out, fast_export_options(formats=("safetensors",), profile=False))
    return out


# --- export / --overwrite -------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    target = user_folder(tmp_path / "docs")
    result = run_cli("export", "--overwrite", "-o", str(target))
    assert result.returncode == 2, result.stderr
    assert "not an edgelm bundle" in result.stderr and "Traceback" not in result.stderr
    assert_intact(target)


def test_the_source_model_folder_can_never_be_the_output(tiny_llama, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(tiny_llama, source)
    before = sorted(p.name for p in source.iterdir())
    result = run_cli("export", str(source), "--overwrite", "-o", str(source))
    assert result.returncode == 2, result.stderr
    assert "holds the source model" in result.stderr
    assert sorted(p.name for p in source.iterdir()) == before
    with pytest.raises(BundleError, match="holds the source model"):  # nor a folder above it
        export_bundle(source, tmp_path, fast_export_options(overwrite=True))


def test_overwrite_replaces_a_bundle_atomically(tiny_llama, small_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(small_bundle, out)
    old_created = json.loads((out / "manifest.json").read_text())["created"]
    export_bundle(tiny_llama, out, fast_export_options(formats=("safetensors",), profile=False, overwrite=True))
    assert is_bundle(out)
    assert json.loads((out / "manifest.json").read_text())["created"] >= old_created
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no .partial / .old left behind


def test_a_folder_created_at_the_output_during_an_export_is_left_alone(tiny_llama, tmp_path):
    out = tmp_path / "bundle"
    from contextlib import contextmanager

    @contextmanager
    def step(name):
        yield
        if name.startswith("Loading the fp32"):  # the user makes a folder there meanwhile
            user_folder(out)

    with pytest.raises(BundleError, match="appeared while edgelm was writing"):
        export_bundle(tiny_llama, out, fast_export_options(formats=("safetensors",), profile=False), step=step)
    assert_intact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_folder_created_during_an_overwrite_export_is_not_replaced_unless_a_bundle(tiny_llama, tmp_path):
    out = tmp_path / "bundle"
    from contextlib import contextmanager

    @contextmanager
    def step(name):
        yield
        if name.startswith("Loading the fp32"):
            user_folder(out)

    with pytest.raises(BundleError, match="not an edgelm bundle"):
        export_bundle(
            tiny_llama, out, fast_export_options(formats=("safetensors",), profile=False, overwrite=True), step=step
        )
    assert_intact(out)


def test_output_on_a_read_only_place_or_under_a_file_is_exit_2(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for output in (blocker / "out", Path("/proc/edgelm-out")):
        result = run_cli("export", "--formats", "safetensors", "--no-profile", "-o", str(output))
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("edgelm: error:")


def test_stale_staging_folders_of_dead_runs_are_cleaned_and_live_ones_kept(tmp_path):
    destination = tmp_path / "bundle"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_tag = owner_tag(dead.pid)
    dead.wait()
    stale = tmp_path / f".bundle.partial-{dead_tag}-0a0b0c0d"
    stale_old = tmp_path / f".bundle.old-{dead_tag}-0a0b0c0e"
    live = tmp_path / f".bundle.partial-{owner_tag()}-0a0b0c0f"
    lookalike = user_folder(tmp_path / ".bundle.partial-mine")
    other = user_folder(tmp_path / f".other.partial-{dead_tag}-0a0b0c0d")
    for folder in (stale, stale_old, live):
        (folder / "x").mkdir(parents=True)
    removed = clean_stale(destination)
    assert not stale.exists() and live.exists()
    assert destination.exists() and not stale_old.exists()  # the kill fell between two renames: old bundle restored
    assert_intact(lookalike)
    assert_intact(other)
    assert removed == [stale]


def test_exchange_leaves_no_moment_without_a_bundle(tmp_path):
    destination = tmp_path / "bundle"
    (destination / "old").mkdir(parents=True)
    work = make_staging(destination)
    (work / "new").mkdir()
    old = move_into_place(work, destination, replace_existing=True)
    assert (destination / "new").is_dir() and (old / "old").is_dir()


def test_atomic_bundle_dir_keeps_the_old_bundle_when_the_job_fails(small_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(small_bundle, out)
    with pytest.raises(RuntimeError), atomic_bundle_dir(out, overwrite=True):
        raise RuntimeError("converter crashed")
    assert is_bundle(out) and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# --- push ----------------------------------------------------------------------------------


def test_push_refuses_an_existing_folder_that_is_not_a_bundle(small_bundle, tmp_path):
    destination = user_folder(tmp_path / "home")
    with pytest.raises(BundleError, match="not an edgelm bundle"):
        push_bundle(small_bundle, LocalTransport(), str(destination), formats=("reference-fp32",))
    assert_intact(destination)
    result = run_cli(
        "push", str(small_bundle), "--device", "local", "--to", str(destination), "--formats", "reference-fp32"
    )
    assert result.returncode == 2 and "not an edgelm bundle" in result.stderr, result.stderr
    assert_intact(destination)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_push_refuses_a_relative_or_root_destination(small_bundle):
    for bad in ("relative/path", "/", "//", "/tmp/x/../.."):
        with pytest.raises(BundleError, match="absolute folder"):
            push_bundle(small_bundle, LocalTransport(), bad, formats=("reference-fp32",))


def test_push_replaces_an_earlier_push_and_cleans_dead_leftovers(small_bundle, tmp_path, monkeypatch):
    destination = tmp_path / "device" / "bundle"
    push_bundle(small_bundle, LocalTransport(), str(destination), formats=("reference-fp32",))
    assert is_bundle(destination)
    from edgelm.staging import host_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    tag = owner_tag(dead.pid)
    dead.wait()
    leftover = Path(f"{destination}.partial-{host_tag()}-{tag}-deadbeef")
    (leftover / "tokenizer").mkdir(parents=True)
    foreign = Path(f"{destination}.partial-ffffffff-{tag}-deadbeef")  # another machine's push: not ours to judge
    foreign.mkdir()
    push_bundle(small_bundle, LocalTransport(), str(destination), formats=("reference-fp32",))
    assert is_bundle(destination) and not leftover.exists() and foreign.exists()


def test_push_keeps_a_file_at_the_destination(small_bundle, tmp_path):
    destination = tmp_path / "notes.txt"
    destination.write_text("mine")
    with pytest.raises(BundleError):
        push_bundle(small_bundle, LocalTransport(), str(destination), formats=("reference-fp32",))
    assert destination.read_text() == "mine"


def test_budget_search_refuses_to_replace_a_user_folder(tmp_path):
    from edgelm.compress.budget import search_budget
    from edgelm.export import ExportOptions

    target = user_folder(tmp_path / "docs")
    with pytest.raises(BundleError, match="not a folder edgelm wrote"):
        search_budget(None, target, max_mb=1, max_ppl_ratio=1.1, export_options=ExportOptions(), overwrite=True)
    assert_intact(target)


def test_compress_refuses_to_replace_a_user_folder(tmp_path):
    from edgelm.compress.pipeline import compress_model
    from edgelm.compress.recipe import CompressRecipe, Prune

    target = user_folder(tmp_path / "docs")
    with pytest.raises(BundleError, match="not a folder edgelm wrote"):
        compress_model(None, target, CompressRecipe(prune=Prune("l1", 0.5)), overwrite=True)
    assert_intact(target)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_is_bundle_is_false_for_anything_but_a_bundle(tmp_path, small_bundle):
    assert is_bundle(small_bundle)
    assert not is_bundle(user_folder(tmp_path / "u"))
    (tmp_path / "link").symlink_to(small_bundle)
    assert not is_bundle(tmp_path / "link")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text('{"schema_version": 1}')
    assert not is_bundle(fake)
