"""How long the README's first command takes: the android preset on the default model, cold,
then the same command again (an unchanged re-run keeps the bundle: edgelm.up_to_date).

    python benchmarks/export_time.py --out benchmarks/results/export_time.json [--no-background]
    python benchmarks/export_time.py --out benchmarks/results/export_time_readme_command.json --readme-command

Runs `edgelm export --target android --repeats 1 --new-tokens 64` (as the end-to-end test
does; with --readme-command, the README's first command as it stands: each artifact profiled
with the default three runs of 128 new tokens) into a temporary folder, records the wall
time, the bundle's step table, this machine and its memory bandwidth measured in the same
run, and the re-run's wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bandwidth_gb_s

from edgelm.bundle import read_bundle
from edgelm.profile import device_record

SHORT_PROFILE = ["--repeats", "1", "--new-tokens", "64"]


def timed_export(output: Path, extra: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the export and its worker processes, its stdout). The CPU
    seconds are the work done, which the machine's other load moves much less than the wall time
    (the same commit's cold export took 585 s on one day and 997 s on another, on one machine)."""
    command = [
        sys.executable,
        "-m",
        "edgelm",
        "export",
        "--target",
        "android",
        "-o",
        str(output),
        *extra,
    ]
    start, cpu = time.perf_counter(), _children_cpu_s()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"export failed ({result.returncode}): {result.stderr[-2000:]}")
    return time.perf_counter() - start, _children_cpu_s() - cpu, result.stdout


def _children_cpu_s() -> float:
    """User + system CPU seconds of every finished child process (and theirs, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-background", action="store_true", help="export every artifact in one process")
    parser.add_argument(
        "--keep",
        type=Path,
        help="write the bundle here (a new folder) and keep it, e.g. for benchmarks/vendor_runtimes.py",
    )
    parser.add_argument(
        "--readme-command",
        action="store_true",
        help="the README's command as it stands (default profile) instead of the end-to-end test's short profile",
    )
    args = parser.parse_args()
    extra = ([] if args.readme_command else SHORT_PROFILE) + (["--no-background"] if args.no_background else [])
    bandwidth = bandwidth_gb_s()
    with tempfile.TemporaryDirectory() as scratch:
        output = args.keep or Path(scratch) / "smollm2"
        cold_s, cold_cpu_s, _ = timed_export(output, extra)
        rerun_s, _, rerun_out = timed_export(output, extra)
        manifest = read_bundle(output)
    record = {
        "command": " ".join(["edgelm export --target android", *extra]),
        "cold_export_s": round(cold_s, 1),
        "cold_export_cpu_s": round(cold_cpu_s, 1),
        "unchanged_rerun_s": round(rerun_s, 1),
        "rerun_said_up_to_date": "is up to date" in rerun_out,
        "export_steps": manifest.export_steps,
        "artifacts": {
            a.name: {
                "ppl_ratio": a.parity["ppl_ratio"],
                "decode_tok_s": (a.profile or {}).get("decode_tok_s"),
                "vendor_runtimes": [r["result"] for r in a.vendor_runtimes],
            }
            for a in manifest.artifacts
        },
        "device": device_record(),
        "memory_bandwidth_gb_s": bandwidth,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    shown = ("cold_export_s", "cold_export_cpu_s", "unchanged_rerun_s", "memory_bandwidth_gb_s")
    print(json.dumps({k: record[k] for k in shown}))


if __name__ == "__main__":
    main()
