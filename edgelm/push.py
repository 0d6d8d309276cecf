"""`edgelm push`: copy what a device's runtime needs from a bundle, never leaving a half bundle.

The device gets the tokenizer, the chosen artifacts and a manifest listing exactly those
(so `edgelm.load` there verifies every file it has and expects no other). Everything goes
to a staging folder beside the destination; each file's sha256 is checked on the device;
only then is the staging folder renamed to the destination. A connection dropped mid-copy
leaves at most the staging folder (removed when the device still answers, else by the next
push from this machine), never a folder under the final name that looks complete. An
existing destination is replaced only when it is an edgelm bundle: `--to ~` is refused.
"""

from __future__ import annotations

import json
import posixpath
import re
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgelm.bundle import MANIFEST, Manifest, read_bundle
from edgelm.devices import ADBTransport, Transport
from edgelm.errors import BundleError, DeviceError, UnsupportedError
from edgelm.model import read_json_object
from edgelm.staging import host_tag, owner_alive, owner_tag

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
    chosen = [
        a for a in manifest.artifacts if (a.name in formats or a.format in formats if formats else a.runtime != "torch")
    ]
    if not chosen:
        known = ", ".join(a.name for a in manifest.artifacts)
        raise UnsupportedError(f"no artifact of the bundle matches {', '.join(formats or ())}; it has: {known}")

    # the files an artifact's vendor runtime loads it with (onnxruntime-genai's config) go with it
    vendor_files = {rel for a in chosen for vendor in a.vendor_runtimes for rel in vendor.get("files", [])}

    def belongs(rel: str) -> bool:
        return (
            rel.startswith("tokenizer/")
            or any(rel == a.path or rel.startswith(a.path + ".") for a in chosen)
            or rel in vendor_files
        )

    data = manifest.to_dict()
    names = {a.name for a in chosen}
    data["artifacts"] = [a for a in data["artifacts"] if a["name"] in names]
    data["files"] = {rel: sha for rel, sha in manifest.files.items() if belongs(rel)}
    return Manifest.from_dict(data)


# Run on the device in one shell: replace only an edgelm bundle, with the old one restored if
# the second rename fails. $1 destination, $2 staging folder, $3 name for the old bundle.
_SWAP_SCRIPT = r"""
if [ -L "$1" ] || { [ -e "$1" ] && ! { [ -d "$1" ] && grep -q '"edgelm_version"' "$1/manifest.json" 2>/dev/null; }; }
then exit 42; fi
if [ -d "$1" ]; then
  mv "$1" "$3" || exit 1
  if ! mv "$2" "$1"; then mv "$3" "$1"; exit 1; fi
  rm -rf "$3"
else
  mv "$2" "$1"
fi
"""
_NOT_A_BUNDLE = 42
# Lists "kind name" for every staging sibling of $1 and whether $1 exists.
_LIST_SCRIPT = r"""
for d in "$1".partial-* "$1".old-*; do [ -d "$d" ] && [ ! -L "$d" ] && echo "staging $d"; done
if [ -L "$1" ]; then echo "dest symlink"; elif [ -d "$1" ]; then echo "dest dir";
elif [ -e "$1" ]; then echo "dest other"; fi
"""


def check_destination(destination: str) -> str:
    """A push destination: absolute, normalised, not the root; BundleError otherwise."""
    clean = posixpath.normpath(destination) if destination else ""
    if not clean.startswith("/") or clean in ("/", "//") or "\\" in clean or any(c in clean for c in "\n\r\0"):
        raise BundleError(
            f"--to {destination!r}: give an absolute folder on the device (e.g. /data/local/tmp/edgelm/x)"
        )
    return clean


def _staging_name(destination: str, kind: str) -> str:
    return f"{destination}.{kind}-{host_tag()}-{owner_tag()}-{secrets.token_hex(4)}"


def _device_state(transport: Transport, destination: str) -> tuple[str, list[str]]:
    """(what is at the destination: "", "dir", "symlink" or "other"; staging siblings there)."""
    listing = transport.run(["sh", "-c", _LIST_SCRIPT, "sh", destination], timeout=60).stdout.splitlines()
    state = next((line.split(" ", 1)[1] for line in listing if line.startswith("dest ")), "")
    return state, [line.split(" ", 1)[1] for line in listing if line.startswith("staging ")]


def _check_replaceable_on_device(transport: Transport, destination: str, state: str) -> None:
    """Only an edgelm bundle (a valid manifest.json, read back and checked here) is ever replaced."""
    if not state:
        return
    refusal = BundleError(
        f"{transport.address}:{destination} exists and is not an edgelm bundle; push replaces only "
        "a bundle it wrote — choose another --to"
    )
    if state != "dir":
        raise refusal
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / MANIFEST
        try:
            transport.pull(f"{destination}/{MANIFEST}", local, timeout=60)
            Manifest.from_dict(read_json_object(local, BundleError, ""))
        except (DeviceError, BundleError, OSError) as err:
            raise refusal from err


def _clean_stale_on_device(transport: Transport, destination: str, leftovers: list[str], exists: bool) -> None:
    """Remove staging folders of this machine's dead pushes (live ones and other hosts' are kept);
    an `.old` bundle left by a kill between the two renames goes back to the destination."""
    pattern = re.compile(rf"^{re.escape(destination)}\.(partial|old)-{host_tag()}-(\d+)-(\d+)-[0-9a-f]+$")
    for path in leftovers:
        match = pattern.match(path)
        if not match or owner_alive(int(match.group(2)), int(match.group(3))):
            continue
        if match.group(1) == "old" and not exists:
            transport.run(["mv", path, destination], timeout=60)
            exists = True
            continue
        transport.run(["rm", "-rf", path], timeout=120, check=False)


def push_bundle(
    bundle: Path,
    transport: Transport,
    destination: str | None = None,
    formats: tuple[str, ...] | None = None,
    on_file: Callable[[str, int], None] | None = None,
) -> PushResult:
    """Push `bundle` (verified locally first) to `destination` on the device.

    An existing destination is replaced only when it is an edgelm bundle (checked before
    anything is copied and again at the swap); anything else is refused with BundleError.
    """
    bundle = Path(bundle)
    manifest = device_manifest(read_bundle(bundle), formats)
    destination = check_destination(destination or default_destination(transport, bundle))
    state, leftovers = _device_state(transport, destination)
    _check_replaceable_on_device(transport, destination, state)
    _clean_stale_on_device(transport, destination, leftovers, exists=bool(state))
    staging = _staging_name(destination, "partial")
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
        # replace an earlier bundle only now, with the old one restored if the swap fails
        swap = transport.run(
            ["sh", "-c", _SWAP_SCRIPT, "sh", destination, staging, _staging_name(destination, "old")],
            check=False,
            timeout=600,
        )
        if swap.returncode == _NOT_A_BUNDLE:
            raise BundleError(
                f"{transport.address}:{destination} appeared while pushing and is not an edgelm bundle; "
                "it was left as it is"
            )
        if swap.returncode != 0:
            raise DeviceError(
                f"{transport.address}: could not move the pushed bundle into place "
                f"({(swap.stderr or swap.stdout).strip()[-300:] or 'no output'})"
            )
    except BaseException:
        try:
            transport.run(["rm", "-rf", staging], timeout=30, check=False)
        except DeviceError:
            pass  # the device is gone; the staging folder is cleaned by the next push
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
        raise DeviceError(
            f"{transport.address}: sha256 on the device does not match for {', '.join(bad[:5])}"
            f"{' …' if len(bad) > 5 else ''}; the copy was corrupted — push again"
        )
