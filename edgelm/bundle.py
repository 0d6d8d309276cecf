"""The bundle: one folder with manifest.json, tokenizer/, artifacts, report/ and a model card.

Written atomically: everything is built in a temp folder beside the destination and
renamed into place last, so a killed export leaves nothing at the output path. Reading a
bundle checks the manifest against its JSON schema and every file's sha256 before any
artifact is parsed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import BundleError
from edgelm.model import read_json_object, sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "edgelm_version", "source", "target", "tokenizer", "generation", "artifacts", "files"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "edgelm_version": {"type": "string"},
        "created": {"type": "string"},
        "source": {
            "type": "object",
            "required": ["model_id", "model_type", "num_parameters", "sha256", "kind"],
            "properties": {
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "num_parameters": {"type": "integer", "minimum": 0},
            },
        },
        "target": {"type": "string"},
        "tokenizer": {
            "type": "object",
            "required": ["path"],
            "properties": {"path": {"type": "string"}, "chat_template": {"type": "boolean"}},
        },
        "generation": {"type": "object"},
        "parity_text": {"type": "object"},
        "artifacts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "format", "path", "sha256", "bytes", "quant", "runtime", "signature"],
                "properties": {
                    "name": {"type": "string"},
                    "format": {"type": "string"},
                    "path": {"type": "string"},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "bytes": {"type": "integer", "minimum": 0},
                    "quant": {"type": "string"},
                    "runtime": {"type": "string"},
                    "signature": {"type": "object"},
                    "parity": {"type": ["object", "null"]},
                    "profile": {"type": ["object", "null"]},
                },
            },
        },
        "files": {
            "type": "object",
            "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
        "compression": {  # the source was made by `edgelm compress`: its compression.json
            "type": ["object", "null"],
            "properties": {"base_model": {"type": "string"}, "base_model_relation": {"type": "string"},
                           "recipe": {"type": "object"}, "perplexity": {"type": "object"}},
        },
        "device_profiles": {  # `edgelm profile --device`: rows measured on other machines
            "type": "array",
            "items": {"type": "object", "required": ["device", "profiles"],
                      "properties": {"device": {"type": "object"}, "profiles": {"type": "object"}}},
        },
    },
}


@dataclass
class ArtifactEntry:
    """One exported file (or folder, for formats that need several files)."""

    name: str  # unique in the bundle, e.g. "onnx-int4"
    format: str
    path: str  # relative to the bundle root: the file to open
    sha256: str
    bytes: int
    quant: str
    runtime: str
    runtime_version: str = ""
    built_by: str = ""  # which export path made it (generic graph, vendor recipe, ...)
    signature: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None


@dataclass
class Manifest:
    edgelm_version: str
    source: dict[str, Any]
    target: str
    tokenizer: dict[str, Any]
    generation: dict[str, Any]
    artifacts: list[ArtifactEntry] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # every file but manifest.json -> sha256
    parity_text: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)  # the fp32 source model's own parity/profile row
    device_profiles: list[dict[str, Any]] = field(default_factory=list)  # {device, profiles: {artifact: profile}}
    compression: dict[str, Any] | None = None  # how the source came from its base model (edgelm compress)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        validate_manifest(data)
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["artifacts"] = [
            ArtifactEntry(**{k: v for k, v in a.items() if k in ArtifactEntry.__dataclass_fields__})
            for a in data["artifacts"]
        ]
        return cls(**fields)

    def artifact(self, name_or_format: str | None) -> ArtifactEntry:
        """The artifact named `name_or_format`, else the first of that format, else the first."""
        if not self.artifacts:
            raise BundleError("this bundle has no artifacts to run; re-export it")
        if name_or_format is None:
            return self.artifacts[0]
        for entry in self.artifacts:
            if name_or_format in (entry.name, entry.format):
                return entry
        names = ", ".join(a.name for a in self.artifacts)
        raise BundleError(f"no artifact {name_or_format!r} in this bundle; it has: {names}")


def validate_manifest(data: Any) -> None:
    import jsonschema

    try:
        jsonschema.validate(data, MANIFEST_SCHEMA)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        raise BundleError(f"manifest.json does not match schema v{SCHEMA_VERSION} at {where}: {err.message}") from err


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, keyed by POSIX relative path."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


@contextmanager
def atomic_bundle_dir(destination: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `destination`; on success rename it into place.

    On any error (or a kill) nothing appears at `destination`. An existing destination is
    replaced only with overwrite=True, and only after the new bundle is complete.
    """
    destination = Path(destination).resolve()
    if destination.exists() and not overwrite:
        raise BundleError(f"{destination} already exists; pass --overwrite or choose another -o")
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield work
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            destination.rename(old)
            work.rename(destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(destination)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Hash every file in `root`, validate and write manifest.json (the last file written)."""
    manifest.files = hash_tree(root)
    data = manifest.to_dict()
    validate_manifest(data)
    (root / MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_bundle(root: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; with verify, check every file's sha256 first.

    Raises BundleError for a missing/invalid manifest, a missing file or a hash mismatch.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: no manifest.json — not an edgelm bundle (make one with `edgelm export`)")
    manifest = Manifest.from_dict(read_json_object(path, BundleError, "re-export the bundle"))
    if verify:
        for rel, expected in manifest.files.items():
            file = root / rel
            if not file.is_file():
                raise BundleError(f"{file}: listed in manifest.json but missing; the bundle is incomplete — re-export or re-push it")
            if sha256_file(file) != expected:
                raise BundleError(f"{file}: sha256 does not match manifest.json; the file is corrupt or was modified — re-export or re-push it")
    return manifest
