"""The bundle: one folder with manifest.json, tokenizer/, artifacts, report/ and a model card.

Written atomically: everything is built in a temp folder beside the destination and
renamed into place last, so a killed export leaves nothing at the output path. Reading a
bundle checks the manifest against its JSON schema and every file's sha256 before any
artifact is parsed.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import BundleError
from edgelm.model import read_json_object, sha256_file
from edgelm.staging import clean_stale, make_staging, move_into_place

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_READS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")  # what edgelm.tokenizer opens

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "schema_version",
        "edgelm_version",
        "source",
        "target",
        "tokenizer",
        "generation",
        "artifacts",
        "files",
    ],
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
                    "vendor_runtimes": {  # edgelm.vendors: the format's own LLM runtime, run on this file
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["runtime", "package", "result"],
                            "properties": {
                                "runtime": {"type": "string"},
                                "package": {"type": "string"},
                                "result": {"type": "string"},
                                "files": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
        "files": {
            "type": "object",
            "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
        "compression": {  # the source was made by `edgelm compress`: its compression.json
            "type": ["object", "null"],
            "properties": {
                "base_model": {"type": "string"},
                "base_model_relation": {"type": "string"},
                "recipe": {"type": "object"},
                "perplexity": {"type": "object"},
            },
        },
        "export_key": {"type": ["string", "null"]},  # edgelm.up_to_date: what the export depended on
        "device_profiles": {  # `edgelm profile --device`: rows measured on other machines
            "type": "array",
            "items": {
                "type": "object",
                "required": ["device", "profiles"],
                "properties": {"device": {"type": "object"}, "profiles": {"type": "object"}},
            },
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
    recipe: dict[str, Any] | None = None  # how it was quantized: calibration, the recipes tried (edgelm.artifacts)
    vendor_runtimes: list[dict[str, Any]] = field(default_factory=list)  # edgelm.vendors.VendorCheck rows


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
    export_steps: list[dict[str, Any]] = field(default_factory=list)  # {step, seconds, depth, peak_rss_mb}
    export_key: str | None = None  # edgelm.up_to_date: re-running an unchanged export keeps this bundle
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
    """The schema, then the path rule (see check_manifest_paths); BundleError on either."""
    import jsonschema

    try:
        jsonschema.validate(data, MANIFEST_SCHEMA)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        raise BundleError(
            f"manifest.json does not match schema v{SCHEMA_VERSION} at {where}: {str(err.message)[:200]}"
        ) from err
    check_manifest_paths(data)


def check_relative_path(rel: str, what: str) -> str:
    """A manifest path: relative, POSIX, normalised, no `..`, no empty or dot parts."""
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or any(ord(c) < 32 for c in rel)
        or rel != posixpath.normpath(rel)
        or any(part in ("", ".", "..") for part in parts)
        or (len(parts[0]) > 1 and parts[0][1] == ":")
    ):
        raise BundleError(
            f"manifest.json: {what} {rel[:200]!r} is not a plain relative path inside the bundle; "
            "the bundle was tampered with — re-export it"
        )
    return rel


def check_manifest_paths(data: dict[str, Any]) -> None:
    """One path rule for the whole bundle, before anything is opened.

    Every path is relative and stays inside the bundle, every file edgelm opens is listed
    in `files{}` (so its sha256 is checked), and each artifact's own sha256 matches its
    `files{}` entry.
    """
    files: dict[str, str] = data["files"]
    for rel in files:
        check_relative_path(rel, "file")
        if rel == MANIFEST:
            raise BundleError("manifest.json lists itself in files{}; re-export the bundle")
    for artifact in data["artifacts"]:
        path = check_relative_path(artifact["path"], f"artifact {str(artifact['name'])[:80]!r} path")
        if files.get(path) != artifact["sha256"]:
            raise BundleError(
                f"manifest.json: artifact {str(artifact['name'])[:80]!r} ({path}) is not in files{{}} with "
                "its sha256; the bundle was tampered with — re-export it"
            )
        for vendor in artifact.get("vendor_runtimes", []):
            for rel in vendor.get("files", []):
                check_relative_path(rel, f"vendor runtime file of {str(artifact['name'])[:80]!r}")
    tokenizer = check_relative_path(data["tokenizer"]["path"], "tokenizer path")
    if f"{tokenizer}/tokenizer.json" not in files:
        raise BundleError(f"manifest.json: {tokenizer}/tokenizer.json is not listed in files{{}}; re-export the bundle")


def check_files_inside(root: Path, manifest: Manifest) -> None:
    """Each listed file is a regular file whose real path (symlinks resolved) is inside the bundle,
    and the tokenizer folder holds no file the tokenizer would read without it being listed."""
    real_root = root.resolve()
    for rel in manifest.files:
        path = root / rel
        real = path.resolve()
        if real_root not in real.parents:
            raise BundleError(f"{path}: resolves to {real}, outside the bundle; the bundle was tampered with")
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            raise BundleError(f"{path}: not a regular file (a FIFO, device or folder); the bundle was tampered with")
    tokenizer = root / manifest.tokenizer["path"]
    if real_root not in tokenizer.resolve().parents:
        raise BundleError(f"{tokenizer}: outside the bundle; the bundle was tampered with")
    for name in TOKENIZER_READS:
        rel = f"{manifest.tokenizer['path']}/{name}"
        if os.path.lexists(root / rel) and rel not in manifest.files:
            raise BundleError(
                f"{root / rel}: not listed in manifest.json, so it cannot be checked; remove it or re-export"
            )


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, keyed by POSIX relative path."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def is_bundle(path: Path) -> bool:
    """Whether `path` is a folder edgelm wrote: a real directory whose manifest.json is a valid manifest.

    This is what `--overwrite` and `push` require before they replace anything.
    """
    path = Path(path)
    manifest = path / MANIFEST
    if path.is_symlink() or not path.is_dir() or manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        Manifest.from_dict(read_json_object(manifest, BundleError, ""))
    except BundleError:
        return False
    return True


def is_compressed_model(path: Path) -> bool:
    """Whether `path` is a model folder `edgelm compress` wrote (its compression.json is there)."""
    record = Path(path) / "compression.json"
    return not Path(path).is_symlink() and Path(path).is_dir() and record.is_file() and not record.is_symlink()


def check_replaceable(
    destination: Path, overwrite: bool, protect: tuple[Path, ...] = (), ours: Callable[[Path], bool] = is_bundle
) -> None:
    """Refuse (BundleError, exit 2) an output path edgelm may not write or replace.

    Only a folder `ours` recognises as edgelm's (by default a complete bundle) is ever
    replaced; never a folder holding any of `protect` (the source model), a symlink, a file,
    or any other folder.
    """
    for path in protect:
        resolved = Path(path).resolve()
        if resolved == destination.resolve() or destination.resolve() in resolved.parents:
            raise BundleError(f"{destination} holds the source model {path}; choose another output folder")
    if destination.is_symlink():
        raise BundleError(f"{destination} is a symlink; pass the real folder or choose another output")
    if not destination.exists():
        return
    if not overwrite:
        raise BundleError(f"{destination} already exists; pass --overwrite to replace a bundle, or choose another -o")
    if not ours(destination):
        what = "an edgelm bundle (no valid manifest.json)" if ours is is_bundle else "a folder edgelm wrote"
        raise BundleError(
            f"{destination} exists and is not {what}; edgelm replaces only what it wrote — choose another output"
        )


@contextmanager
def atomic_bundle_dir(
    destination: Path, overwrite: bool = False, protect: tuple[Path, ...] = (), ours: Callable[[Path], bool] = is_bundle
) -> Iterator[Path]:
    """Yield a staging folder beside `destination`; on success swap it into place atomically.

    On any error (or a kill) the destination keeps what it had. An existing destination is
    replaced only with overwrite=True, only if it is an edgelm bundle, and only after the
    new bundle is complete; `protect` paths (the source) can never be at or under it.
    Staging folders of dead earlier runs are removed first (see edgelm.staging).
    """
    destination = Path(destination).absolute()
    check_replaceable(destination, overwrite, protect, ours)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(destination)
        work = make_staging(destination)
    except OSError as err:
        raise BundleError(
            f"cannot write beside {destination}: {err.strerror or err}; choose a writable output"
        ) from err
    try:
        yield work
        if os.path.lexists(destination):  # judge what is there now, not what was there at the start
            if not overwrite:
                raise BundleError(
                    f"{destination} appeared while edgelm was writing; it was left as it is (choose "
                    "another output, or pass --overwrite to replace a bundle)"
                )
            check_replaceable(destination, overwrite, protect, ours)
        old = move_into_place(work, destination, replace_existing=overwrite)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
    if not stat.S_ISREG(path.stat().st_mode) or path.is_symlink():
        raise BundleError(f"{path}: not a regular file; the bundle was tampered with — re-export it")
    manifest = Manifest.from_dict(read_json_object(path, BundleError, "re-export the bundle"))
    check_files_inside(root, manifest)
    if verify:
        for rel, expected in manifest.files.items():
            file = root / rel
            if not file.is_file():
                raise BundleError(
                    f"{file}: listed in manifest.json but missing; the bundle is incomplete — re-export or re-push it"
                )
            if sha256_file(file) != expected:
                raise BundleError(
                    f"{file}: sha256 does not match manifest.json; the file is corrupt or was modified — "
                    "re-export or re-push it"
                )
    return manifest
