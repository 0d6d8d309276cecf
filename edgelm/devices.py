"""Devices as transports behind one small interface: run a command, push a file, pull a
file, describe the machine.

    local            this machine
    ssh://user@host[:port]   system ssh/scp in batch mode (keys, no prompts), with timeouts
    adb:SERIAL       an Android device through adb shell/push/pull
    chroot:PATH      a root filesystem (e.g. an arm64 Debian run through qemu-user) entered
                     with chroot; files are copied in and out on the host side

Commands are argument lists; transports that go through a remote shell (ssh, adb) quote
them with shlex, so an argument with spaces or quotes arrives as one argument. A non-zero
exit, a timeout or a missing tool is a DeviceError carrying the device's own message.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgelm.errors import DeviceError

DEFAULT_TIMEOUT = 120.0  # seconds for one command; pushes of large files pass their own
CONNECT_TIMEOUT = 10  # seconds ssh waits for a connection
# Prints the device record edgelm's profiler uses, with nothing but a POSIX shell and /proc.
DESCRIBE_SCRIPT = (
    "echo machine=$(uname -m); echo os=$(uname -sr); "
    "echo cores=$(grep -c ^processor /proc/cpuinfo 2>/dev/null || nproc); "
    "echo memory_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo 2>/dev/null); "
    "echo cpu=$(awk -F': ' '/model name|Hardware|CPU part/ {print $2; exit}' /proc/cpuinfo 2>/dev/null)"
)


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class Transport(Protocol):
    address: str  # as the user wrote it: local, ssh://..., adb:..., chroot:...

    def run(self, argv: list[str], timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> CommandResult:
        """Run argv on the device; DeviceError on a non-zero exit (when check) or a timeout."""

    def push(self, local: Path, remote: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Copy a local file to a path on the device."""

    def pull(self, remote: str, local: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Copy a file from the device to a local path."""


def _call(address: str, argv: list[str], timeout: float, check: bool, what: str) -> CommandResult:
    """Run a host-side command that talks to the device; its failures become DeviceErrors."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as err:
        raise DeviceError(f"{address}: {argv[0]} is not installed on this machine (needed to {what})") from err
    except subprocess.TimeoutExpired as err:
        raise DeviceError(
            f"{address}: no answer within {timeout:.0f} s while trying to {what}; is the device still connected?"
        ) from err
    result = CommandResult(done.returncode, done.stdout, done.stderr)
    if check and done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or "no output")[-1500:]
        raise DeviceError(f"{address}: {what} failed (exit {done.returncode}): {message}")
    return result


class LocalTransport:
    address = "local"

    def run(self, argv: list[str], timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> CommandResult:
        return _call(self.address, argv, timeout, check, f"run {shlex.join(argv)[:200]}")

    def push(self, local: Path, remote: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        Path(remote).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, remote)

    def pull(self, remote: str, local: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        shutil.copyfile(remote, local)


@dataclass
class SSHTransport:
    address: str
    user_host: str
    port: int = 22

    def _options(self) -> list[str]:
        return ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", "-o", "ServerAliveInterval=15"]

    def run(self, argv: list[str], timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> CommandResult:
        command = ["ssh", *self._options(), "-p", str(self.port), self.user_host, "--", shlex.join(argv)]
        return _call(self.address, command, timeout, check, f"run {shlex.join(argv)[:200]}")

    def push(self, local: Path, remote: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        # scp hands the remote path to the remote shell: quote it
        _call(
            self.address,
            [
                "scp",
                "-B",
                "-q",
                *self._options(),
                "-P",
                str(self.port),
                str(local),
                f"{self.user_host}:{shlex.quote(remote)}",
            ],
            timeout,
            True,
            f"copy {local.name} to {remote}",
        )

    def pull(self, remote: str, local: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        _call(
            self.address,
            [
                "scp",
                "-B",
                "-q",
                *self._options(),
                "-P",
                str(self.port),
                f"{self.user_host}:{shlex.quote(remote)}",
                str(local),
            ],
            timeout,
            True,
            f"fetch {remote}",
        )


@dataclass
class ADBTransport:
    address: str
    serial: str

    def run(self, argv: list[str], timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> CommandResult:
        # adb shell joins its arguments into one remote shell line: pass one quoted string
        return _call(
            self.address,
            ["adb", "-s", self.serial, "shell", shlex.join(argv)],
            timeout,
            check,
            f"run {shlex.join(argv)[:200]}",
        )

    def push(self, local: Path, remote: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        _call(
            self.address,
            ["adb", "-s", self.serial, "push", str(local), remote],
            timeout,
            True,
            f"copy {local.name} to {remote}",
        )

    def pull(self, remote: str, local: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        _call(self.address, ["adb", "-s", self.serial, "pull", remote, str(local)], timeout, True, f"fetch {remote}")


@dataclass
class ChrootTransport:
    """A foreign-architecture root filesystem: commands run through `chroot ROOT` (binfmt_misc
    hands foreign binaries to qemu-user), files are copied on the host side."""

    address: str
    root: Path

    def _inside(self, remote: str) -> Path:
        path = (self.root / remote.lstrip("/")).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise DeviceError(f"{self.address}: {remote} is outside the device's root")
        return path

    def run(self, argv: list[str], timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> CommandResult:
        self._ensure_mounts()
        return _call(self.address, ["chroot", str(self.root), *argv], timeout, check, f"run {shlex.join(argv)[:200]}")

    def _ensure_mounts(self) -> None:
        """Mount /proc and /sys inside the root once: runtimes read the CPU count and
        topology there (cpuinfo), the profiler reads memory."""
        for kind, folder, probe in (("proc", "proc", "self"), ("sysfs", "sys", "devices")):
            target = self.root / folder
            if target.is_dir() and not (target / probe).exists():
                _call(self.address, ["mount", "-t", kind, kind, str(target)], 30, True, f"mount /{folder} in the root")

    def push(self, local: Path, remote: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        target = self._inside(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)

    def pull(self, remote: str, local: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        shutil.copyfile(self._inside(remote), local)


def open_device(address: str) -> Transport:
    """The transport for an address (local, ssh://user@host[:port], adb:SERIAL, chroot:PATH)."""
    if address == "local":
        return LocalTransport()
    if address.startswith("ssh://"):
        rest = address.removeprefix("ssh://")
        user_host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
        if not user_host or (port and not port.isdigit()):
            raise DeviceError(f"{address}: expected ssh://user@host or ssh://user@host:port")
        if user_host.startswith("-") or any(c.isspace() for c in user_host):
            raise DeviceError(
                f"{address}: a host cannot start with '-' or hold spaces (ssh would read it as an option)"
            )
        return SSHTransport(address, user_host, int(port or 22))
    if address.startswith("adb:") and address.removeprefix("adb:").startswith("-"):
        raise DeviceError(
            f"{address}: a serial cannot start with '-' (adb would read it as an option); see `adb devices`"
        )
    if address.startswith("adb:") and address.removeprefix("adb:"):
        return ADBTransport(address, address.removeprefix("adb:"))
    if address.startswith("chroot:") and address.removeprefix("chroot:"):
        root = Path(address.removeprefix("chroot:"))
        if not (root / "bin").exists() and not (root / "usr" / "bin").exists():
            raise DeviceError(
                f"{address}: {root} is not a root filesystem (no bin/); build one with scripts/build_arm64_device.sh"
            )
        return ChrootTransport(address, root)
    raise DeviceError(f"unknown device {address!r}; use local, ssh://user@host[:port], adb:SERIAL or chroot:PATH")


def describe(transport: Transport, timeout: float = 60.0) -> dict[str, object]:
    """The device record (machine, cpu, cores, memory, os) read through the transport."""
    result = transport.run(["sh", "-c", DESCRIBE_SCRIPT], timeout=timeout)
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    memory_kb = fields.get("memory_kb", "")
    return {
        "address": transport.address,
        "machine": fields.get("machine", "?"),
        "cpu": fields.get("cpu") or "?",
        "cores": int(fields["cores"]) if fields.get("cores", "").isdigit() else None,
        "memory_gb": round(int(memory_kb) / 2**20, 1) if memory_kb.isdigit() else None,
        "os": fields.get("os", "?"),
    }


def known_devices() -> list[str]:
    """Addresses worth probing: local, every `adb devices` serial, and EDGELM_DEVICES
    (comma-separated addresses, e.g. ssh://pi@raspberrypi,chroot:/var/lib/edgelm/arm64)."""
    addresses = ["local"]
    if shutil.which("adb"):
        try:
            listing = _call("adb", ["adb", "devices"], 15, False, "list adb devices").stdout
            addresses += [
                f"adb:{line.split()[0]}" for line in listing.splitlines()[1:] if line.strip().endswith("device")
            ]
        except DeviceError:
            pass
    addresses += [a.strip() for a in os.environ.get("EDGELM_DEVICES", "").split(",") if a.strip()]
    return list(dict.fromkeys(addresses))
