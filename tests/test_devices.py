"""Devices: transports (local, ssh, adb, chroot) at their boundary with fake binaries on PATH,
and `edgelm push`, which must never leave a half bundle under the final name."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from conftest import fast_export_options

from edgelm.devices import (
    ADBTransport,
    ChrootTransport,
    LocalTransport,
    SSHTransport,
    describe,
    open_device,
)
from edgelm.errors import DeviceError, UnsupportedError
from edgelm.export import export_bundle
from edgelm.push import push_bundle

# A stand-in for ssh/scp/adb: logs its argv, then does locally what the real tool would do on
# the device (remote shell line -> sh -c; push/pull/scp -> copy). FAKE_SLEEP / FAKE_FAIL
# simulate a hung or broken connection.
FAKE_TOOL = r"""#!{python}
import json, os, shutil, subprocess, sys, time
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([name, *args]) + "\n")
if os.environ.get("FAKE_SLEEP"):
    time.sleep(float(os.environ["FAKE_SLEEP"]))
if os.environ.get("FAKE_FAIL"):
    sys.stderr.write(os.environ["FAKE_FAIL"] + "\n")
    sys.exit(255)
if name == "ssh":
    sys.exit(subprocess.run(["sh", "-c", args[args.index("--") + 1]]).returncode)
if name == "scp":
    src, dst = args[-2], args[-1]
    strip = lambda p: p.split(":", 1)[1].strip("'") if ":" in p else p
    shutil.copyfile(strip(src), strip(dst))
if name == "adb":
    serial, verb, rest = args[1], args[2], args[3:]
    if verb == "shell":
        sys.exit(subprocess.run(["sh", "-c", rest[0]]).returncode)
    if verb in ("push", "pull"):
        shutil.copyfile(rest[0], rest[1])
"""


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ssh", "scp", "adb"):
        tool = bin_dir / name
        tool.write_text(FAKE_TOOL.replace("{python}", sys.executable))
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def calls(log: Path) -> list[list[str]]:
    import json

    return [json.loads(line) for line in log.read_text().splitlines()]


def test_addresses_parse_into_transports(tmp_path):
    assert isinstance(open_device("local"), LocalTransport)
    ssh = open_device("ssh://pi@board.local:2222")
    assert isinstance(ssh, SSHTransport) and (ssh.user_host, ssh.port) == ("pi@board.local", 2222)
    assert open_device("ssh://pi@board").port == 22
    assert isinstance(open_device("adb:emulator-5554"), ADBTransport)
    (tmp_path / "root" / "bin").mkdir(parents=True)
    assert isinstance(open_device(f"chroot:{tmp_path / 'root'}"), ChrootTransport)
    for bad in ("telnet://x", "adb:", f"chroot:{tmp_path / 'nothing'}", "ssh://pi@board:port"):
        with pytest.raises(DeviceError):
            open_device(bad)


@pytest.mark.parametrize("address", ["ssh://me@device:2200", "adb:SERIAL1"])
def test_remote_shell_transports_quote_arguments_and_pass_batch_options(fake_tools, address):
    transport = open_device(address)
    result = transport.run(["printf", "%s|", "two words", "it's", "$HOME", "a;b"])
    assert result.stdout == "two words|it's|$HOME|a;b|"  # each argument arrived whole, unexpanded
    argv = calls(fake_tools)[-1]
    if address.startswith("ssh"):
        assert argv[:7] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15"]
        assert ["-p", "2200"] == argv[7:9] and argv[9] == "me@device"
    else:
        assert argv[:4] == ["adb", "-s", "SERIAL1", "shell"] and len(argv) == 5


@pytest.mark.parametrize("address", ["ssh://me@device", "adb:SERIAL1"])
def test_push_and_pull_round_trip_through_the_tools(fake_tools, tmp_path, address):
    transport = open_device(address)
    source = tmp_path / "a file.bin"
    source.write_bytes(b"payload")
    remote = str(tmp_path / "remote dir" / "copy.bin")
    transport.run(["mkdir", "-p", str(tmp_path / "remote dir")])
    transport.push(source, remote)
    transport.pull(remote, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"payload"


@pytest.mark.parametrize("address", ["ssh://me@device", "adb:SERIAL1"])
def test_failures_and_timeouts_are_device_errors_with_the_device_message(fake_tools, monkeypatch, address):
    transport = open_device(address)
    with pytest.raises(DeviceError, match=r"exit 3\): no such thing"):
        transport.run(["sh", "-c", "echo 'no such thing' >&2; exit 3"])
    assert transport.run(["sh", "-c", "exit 4"], check=False).returncode == 4
    monkeypatch.setenv("FAKE_FAIL", "device offline")
    with pytest.raises(DeviceError, match="device offline"):
        transport.run(["true"])
    monkeypatch.delenv("FAKE_FAIL")
    monkeypatch.setenv("FAKE_SLEEP", "5")
    with pytest.raises(DeviceError, match="no answer within 1 s"):
        transport.run(["true"], timeout=1)


def test_a_missing_tool_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceError, match="adb is not installed"):
        open_device("adb:X").run(["true"])


def test_describe_reads_the_device_record_over_the_transport():
    record = describe(LocalTransport())
    assert record["machine"] == os.uname().machine and record["cores"] == os.cpu_count()
    assert record["memory_gb"] > 0 and record["address"] == "local"


def test_chroot_paths_stay_inside_the_root(tmp_path):
    (tmp_path / "root" / "bin").mkdir(parents=True)
    transport = open_device(f"chroot:{tmp_path / 'root'}")
    source = tmp_path / "f.txt"
    source.write_text("x")
    transport.push(source, "/opt/edgelm/f.txt")
    assert (tmp_path / "root" / "opt" / "edgelm" / "f.txt").read_text() == "x"
    with pytest.raises(DeviceError, match="outside the device's root"):
        transport.push(source, "/../../escape.txt")


@pytest.fixture(scope="module")
def onnx_bundle(tiny_llama, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("push") / "bundle"
    export_bundle(tiny_llama, out, fast_export_options(formats=("onnx",), quants=("fp32", "int8"), profile=False))
    return out


def test_push_copies_what_the_runtime_needs_and_the_copy_loads(onnx_bundle, tmp_path):
    import edgelm

    result = push_bundle(onnx_bundle, LocalTransport(), str(tmp_path / "device" / "bundle"), formats=("onnx-int8",))
    pushed = tmp_path / "device" / "bundle"
    assert result.artifacts == ["onnx-int8"] and pushed.is_dir()
    assert not (pushed / "reference").exists() and not (pushed / "onnx" / "fp32" / "model.onnx").exists()
    assert (pushed / "onnx" / "int8" / "genai_config.json").is_file()  # what onnxruntime-genai loads it with
    assert not list((tmp_path / "device").glob("*.partial-*"))
    model = edgelm.load(pushed)  # the device manifest lists exactly what is there, all verified
    assert model.generate("The parity", max_new_tokens=3) == edgelm.load(onnx_bundle, format="onnx-int8").generate(
        "The parity", max_new_tokens=3
    )
    with pytest.raises(UnsupportedError, match="no artifact"):
        push_bundle(onnx_bundle, LocalTransport(), str(tmp_path / "x"), formats=("gguf",))


class DroppedConnection(LocalTransport):
    """Copies `survive` files, then the link drops: pushes and commands fail from then on."""

    def __init__(self, survive: int):
        self.left = survive

    def push(self, local, remote, timeout=120.0):
        if self.left == 0:
            raise DeviceError("connection reset by peer")
        self.left -= 1
        super().push(local, remote, timeout)

    def run(self, argv, timeout=120.0, check=True):
        if self.left == 0 and argv[0] != "mkdir":
            raise DeviceError("connection reset by peer")
        return super().run(argv, timeout, check)


@pytest.mark.parametrize("survive", [0, 1, 3])
def test_a_push_interrupted_mid_copy_leaves_nothing_under_the_final_name(onnx_bundle, tmp_path, survive):
    destination = tmp_path / "device" / "bundle"
    with pytest.raises(DeviceError, match="connection reset"):
        push_bundle(onnx_bundle, DroppedConnection(survive), str(destination))
    assert not destination.exists()
    # an earlier complete copy survives a failed re-push untouched
    push_bundle(onnx_bundle, LocalTransport(), str(destination))
    before = sorted(p.relative_to(destination) for p in destination.rglob("*"))
    with pytest.raises(DeviceError):
        push_bundle(onnx_bundle, DroppedConnection(survive), str(destination))
    assert sorted(p.relative_to(destination) for p in destination.rglob("*")) == before


def test_a_copy_corrupted_on_the_way_is_caught_by_the_device_side_hash(onnx_bundle, tmp_path):
    class Corrupting(LocalTransport):
        def push(self, local, remote, timeout=120.0):
            super().push(local, remote, timeout)
            if remote.endswith(".onnx"):
                with open(remote, "r+b") as fh:
                    fh.write(b"XX")

    destination = tmp_path / "device" / "bundle"
    with pytest.raises(DeviceError, match="sha256 on the device does not match"):
        push_bundle(onnx_bundle, Corrupting(), str(destination))
    assert not destination.exists() and not list((tmp_path / "device").glob("*.partial-*"))


def test_profile_on_a_device_adds_labelled_rows_to_the_report(onnx_bundle, tmp_path, monkeypatch):
    """The whole path through a transport (here `local`): push, run edgelm's profiler there,
    bring the JSON back, and record it; the bundle still verifies afterwards."""
    import json
    import shutil

    from edgelm.bundle import read_bundle
    from edgelm.device_profile import profile_on_device

    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, bundle)
    monkeypatch.setenv("EDGELM_DEVICE_PYTHON", sys.executable)
    remote = str(tmp_path / "device" / "bundle")
    with pytest.raises(DeviceError, match="push it first"):
        profile_on_device(bundle, LocalTransport(), remote)
    push_bundle(bundle, LocalTransport(), remote, formats=("onnx-int8",))
    entry = profile_on_device(bundle, LocalTransport(), remote, new_tokens=8, repeats=1, threads=1)
    assert entry["device"]["machine"] == os.uname().machine and entry["device"]["address"] == "local"
    assert entry["profiles"]["onnx-int8"]["decode_tok_s"] > 0
    manifest = read_bundle(bundle)  # report files rewritten, hashes updated
    assert manifest.device_profiles[0]["profiles"].keys() == {"onnx-int8"}
    rows = json.loads((bundle / "report" / "report.json").read_text())["rows"]
    device_rows = [r for r in rows if "@ local" in r["artifact"]]
    assert len(device_rows) == 1 and device_rows[0]["ppl_ratio"] == manifest.artifact("onnx-int8").parity["ppl_ratio"]
    assert "onnx-int8 @ local" in (bundle / "report" / "report.md").read_text()
