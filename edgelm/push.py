"""`edgelm push`: copy what a device's runtime needs from a bundle, never leaving a half bundle.

The device gets the tokenizer, the chosen artifacts and a manifest listing exactly those
(so `edgelm.load` there verifies every file it has and expects no other). Everything goes
to a staging folder beside the destination; each file's sha256 is checked on the device;
only then is the staging folder renamed to the destination. A connection dropped mid-copy
leaves at most the staging folder (removed when the device still answers), never a folder
under the final name that looks complete.
"""

from __future__ import annotations

import json
import posixpath
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgelm.bundle import MANIFEST, Manifest, read_bundle
from edgelm.devices import ADBTransport, Transport
from edgelm.errors import DeviceError, UnsupportedError

SECONDS_PER_MB = 2.0  # push timeout allowance per MB, on top of the base timeout (slow USB 2 / Wi-Fi)


@dataclass
class PushResult:
    destination: str
    files: dict[str, str]  # relative path -> sha256, as verified on the device
    artifacts: list[str]
    bytes: int


def default_destination(transport: Transport, bundle: Path) -> str:
    base = "/data/local/tmp/edgelm" if isinstance(transport, ADBTransport) else "/tmp/edgelm"
    return f"{base}/{bundle.resolve().name}"


def device_manifest(manifest: Manifest, formats: tuple[str, ...] | None) -> Manifest:
    """The manifest a device gets: the chosen artifacts (by name or format; by default every
    artifact a runtime-only install can run, i.e. all but the torch reference) and their files."""
    chosen = [a for a in manifest.artifacts
              if (a.name in formats or a.format in formats if formats else a.runtime != "torch")]
    if not chosen:
        known = ", ".join(a.name for a in manifest.artifacts)
        raise UnsupportedError(f"no artifact of the bundle matches {', '.join(formats or ())}; it has: {known}")

    def belongs(rel: str) -> bool:
        return rel.startswith("tokenizer/") or any(rel == a.path or rel.startswith(a.path + ".") for a in chosen)

    data = manifest.to_dict()
    names = {a.name for a in chosen}
    data["artifacts"] = [a for a in data["artifacts"] if a["name"] in names]
    data["files"] = {rel: sha for rel, sha in manifest.files.items() if belongs(rel)}
    return Manifest.from_dict(data)


def push_bundle(bundle: Path, transport: Transport, destination: str | None = None,
                formats: tuple[str, ...] | None = None, on_file: Callable[[str, int], None] | None = None
                ) -> PushResult:
    """Push `bundle` (verified locally first) to `destination` on the device."""
    bundle = Path(bundle)
    manifest = device_manifest(read_bundle(bundle), formats)
    destination = (destination or default_destination(transport, bundle)).rstrip("/")
    staging = f"{destination}.partial-{secrets.token_hex(4)}"
    files = dict(manifest.files)
    try:
        folders = sorted({posixpath.dirname(f"{staging}/{rel}") for rel in files} | {staging})
        transport.run(["mkdir", "-p", *folders])
        total = 0
        for rel in files:
            size = (bundle / rel).stat().st_size
            transport.push(bundle / rel, f"{staging}/{rel}", timeout=60 + SECONDS_PER_MB * size / 1e6)
            total += size
            if on_file:
                on_file(rel, size)
        with tempfile.TemporaryDirectory() as scratch:
            local_manifest = Path(scratch) / MANIFEST
            local_manifest.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
            transport.push(local_manifest, f"{staging}/{MANIFEST}")
        _verify_on_device(transport, staging, files)
        # replace any earlier copy only now, in one rename on the device
        transport.run(["sh", "-c", 'rm -rf "$1" && mv "$2" "$1"', "sh", destination, staging])
    except BaseException:
        try:
            transport.run(["rm", "-rf", staging], timeout=30, check=False)
        except DeviceError:
            pass  # the device is gone; only the staging name can be left behind
        raise
    return PushResult(destination, files, [a.name for a in manifest.artifacts], total)


def _verify_on_device(transport: Transport, staging: str, files: dict[str, str]) -> None:
    result = transport.run(["sha256sum", *(f"{staging}/{rel}" for rel in files)], timeout=600)
    seen = {}
    for line in result.stdout.splitlines():
        digest, _, path = line.strip().partition("  ")
        seen[posixpath.relpath(path, staging)] = digest
    bad = [rel for rel, expected in files.items() if seen.get(rel) != expected]
    if bad:
        raise DeviceError(f"{transport.address}: sha256 on the device does not match for {', '.join(bad[:5])}"
                          f"{' …' if len(bad) > 5 else ''}; the copy was corrupted — push again")
