"""`edgelm profile BUNDLE --device D`: run edgelm's own profiler on a device and add its rows
to the bundle's report, labelled with the device record.

The device needs a runtime-only install of edgelm (no torch: `pip install edgelm` plus the
runtimes of the formats pushed) and the bundle pushed there (`edgelm push`). The profile
runs there as `python3 -m edgelm profile <remote bundle> --json <file>`, the JSON comes
back, and the bundle's manifest and report gain one `device_profiles` entry per run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edgelm.bundle import MANIFEST, read_bundle
from edgelm.devices import Transport, describe
from edgelm.errors import DeviceError
from edgelm.model import read_json_object
from edgelm.push import default_destination

PROFILE_TIMEOUT = 3600.0  # seconds for the whole on-device profile (emulated arm64 is slow)


def device_python() -> str:
    """The interpreter to run on the device (EDGELM_DEVICE_PYTHON, default python3)."""
    return os.environ.get("EDGELM_DEVICE_PYTHON", "python3")


def profile_on_device(
    bundle: Path,
    transport: Transport,
    remote: str | None = None,
    formats: tuple[str, ...] = (),
    new_tokens: int = 128,
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Profile the pushed copy of `bundle` on the device; record and return the entry."""
    bundle = Path(bundle)
    remote = (remote or default_destination(transport, bundle)).rstrip("/")
    record = describe(transport)
    check = transport.run(["test", "-f", f"{remote}/{MANIFEST}"], check=False)
    if check.returncode != 0:
        raise DeviceError(
            f"{transport.address}: no bundle at {remote}; push it first: "
            f"edgelm push {bundle} --device {transport.address}"
        )
    out = f"{remote}/device-profile.json"
    names = list(formats) or [None]
    profiles: dict[str, Any] = {}
    for name in names:
        argv = [
            device_python(),
            "-m",
            "edgelm",
            "profile",
            remote,
            "--json",
            out,
            "--new-tokens",
            str(new_tokens),
            "--repeats",
            str(repeats),
        ]
        argv += ["--format", name] if name else []
        argv += ["--threads", str(threads)] if threads else []
        transport.run(argv, timeout=PROFILE_TIMEOUT)
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / "profile.json"
            transport.pull(out, local)
            profiles |= read_json_object(local, DeviceError, "the device's edgelm wrote no profile")
    entry = {
        "device": record | _runtime_record(profiles),
        "profiles": profiles,
        "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "remote": remote,
    }
    _record(bundle, entry)
    return entry


def _runtime_record(profiles: dict[str, Any]) -> dict[str, Any]:
    """The device's own view (edgelm's device_record from the profile run): CPU, versions."""
    first = next(iter(profiles.values()), {})
    device = first.get("device", {}) if isinstance(first, dict) else {}
    return {key: device[key] for key in ("cpu", "python", "versions") if key in device}


def _record(bundle: Path, entry: dict[str, Any]) -> None:
    """Add the entry to manifest.json and rewrite the report with the device rows beside the
    local ones; the report files' hashes are updated, the manifest written atomically."""
    from edgelm.model import sha256_file
    from edgelm.report import write_report

    manifest = read_bundle(bundle)  # verified: the rows describe these exact files
    manifest.device_profiles = [
        p for p in manifest.device_profiles if p["device"].get("address") != entry["device"]["address"]
    ] + [entry]
    write_report(bundle / "report", manifest)
    for file in (bundle / "report").rglob("*"):
        if file.is_file():
            manifest.files[file.relative_to(bundle).as_posix()] = sha256_file(file)
    path = bundle / MANIFEST
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    os.replace(temporary, path)
