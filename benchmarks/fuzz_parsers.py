"""Byte-mutation fuzzing of every format parser, ≥ 10,000 mutants each, every case in a child
process under an address-space limit (the harness is tests/fuzzing.py; CI runs a few hundred
per parser in tests/test_fuzz.py).

The bundle to mutate is a tiny random Llama exported to every installed format (built here
from a config, no downloads). Outcomes per parser: ok / refused (EdgeLMError, exit 2) and
the bad ones, which must all be 0: bug (exit 3), crash, hang, canary.

    python benchmarks/fuzz_parsers.py --cases 10000 --out benchmarks/results/fuzz_parsers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzzing import PARSERS, fuzz_parser
from tiny_models import build_tiny_model

from edgelm.export import ExportOptions, export_bundle
from edgelm.parity import ParitySettings
from edgelm.profile import device_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="mutants per parser")
    parser.add_argument("--parsers", default=",".join(PARSERS))
    parser.add_argument("--workers", type=int, default=2, help="parsers fuzzed at once (one child process each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz_parsers.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgelm-fuzz-") as tmp:
        scratch = Path(tmp)
        model = build_tiny_model("llama", scratch / "model")
        bundle = scratch / "bundle"
        export_bundle(
            model, bundle, ExportOptions(parity=ParitySettings(max_tokens=256, window=64, stride=64), profile=False)
        )
        names = [p for p in args.parsers.split(",") if p]
        with ThreadPoolExecutor(args.workers) as pool:
            results = list(
                pool.map(lambda name: fuzz_parser(bundle, name, args.cases, scratch / f"fuzz-{name}", seed=7), names)
            )
        for result in results:
            print(json.dumps(result.to_dict()))
    report = {
        "cases_per_parser": args.cases,
        "device": device_record(),
        "bad_total": sum(r.bad for r in results),
        "parsers": [r.to_dict() for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"bad outcomes in all: {report['bad_total']}")


if __name__ == "__main__":
    main()
