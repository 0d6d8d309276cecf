"""Re-running an unchanged export keeps the bundle instead of rebuilding it (as make would).

An export is determined by the source model's bytes, the export options, edgelm's code (its
version and the digest of its own source files, so a changed checkout exports again), the
runtimes' versions, and the machine its profiles were measured on. The manifest records one
digest of all of them (`export_key`). When the output folder already holds a bundle with the
same key whose every file still matches its sha256, `export_bundle` returns that bundle's
manifest in seconds instead of spending half an hour re-exporting the same files.
`--rebuild` (ExportOptions.reuse = False) exports anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from edgelm.bundle import Manifest, read_bundle
from edgelm.errors import EdgeLMError
from edgelm.model import SourceModel, sha256_file

if TYPE_CHECKING:
    from edgelm.export import ExportOptions

# options that change how an export runs, not what it writes or measures
NOT_IN_KEY = ("overwrite", "background", "reuse")
SIDE_FILE_LIMIT = 64 << 20  # a source folder's config/tokenizer files are hashed; larger files are weights


def export_key(source: SourceModel, options: ExportOptions) -> str:
    """The digest of everything an export's result depends on."""
    from edgelm import __version__
    from edgelm.profile import device_record

    machine = device_record()
    record = {
        "source_sha256": source.sha256,
        "source_files": _side_files(source),
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in NOT_IN_KEY},
        "edgelm": __version__,
        "edgelm_code": edgelm_code_digest(),
        "versions": machine["versions"],
        "machine": [machine["cpu"], machine["cores"], machine["python"]],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def code_digest(folders: Iterable[Path]) -> str:
    """sha256 over the Python files under `folders` (relative paths and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            digest.update(f"{folder.name}/{path.relative_to(folder)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def edgelm_code_digest() -> str:
    """The digest of edgelm's own code as installed: the version alone stays the same across
    every change made in a development checkout, where a kept bundle would then be stale."""
    import edgelm
    import edgelm.exporters
    import edgelm.runtimes

    return code_digest(Path(p) for package in (edgelm, edgelm.exporters, edgelm.runtimes) for p in package.__path__)


def _side_files(source: SourceModel) -> dict[str, str]:
    """sha256 of a source folder's other files (config, tokenizer, chat template): the weights'
    digest alone would miss an edited tokenizer."""
    folder = Path(source.path)
    if source.kind != "hf-folder" or not folder.is_dir():
        return {}
    weights = {Path(w).name for w in source.weight_files}
    return {
        item.name: sha256_file(item)
        for item in sorted(folder.iterdir())
        if item.is_file()
        and not item.is_symlink()
        and item.name not in weights
        and item.stat().st_size <= SIDE_FILE_LIMIT
    }


def current_bundle(output: Path, key: str) -> Manifest | None:
    """The manifest of the bundle at `output` if it was made with `key` and is intact, else None."""
    if not (output / "manifest.json").is_file():
        return None
    try:
        manifest = read_bundle(output, verify=True)
    except EdgeLMError:
        return None  # damaged or foreign: the export goes on (and --overwrite decides, as always)
    return manifest if manifest.export_key == key else None
