"""TFLite int4 against int8 on one bundle: file size, parity (from the manifest) and decode speed,
interleaved round by round, with this machine's read bandwidth measured in the same run.

    python benchmarks/tflite_int4_speed.py BUNDLE --out benchmarks/results/tflite_int4_speed.json

BUNDLE: an export with `--formats tflite --quant int8,int4`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bandwidth_gb_s

import edgelm
from edgelm.bundle import read_bundle
from edgelm.profile import device_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    manifest = read_bundle(args.bundle)
    names = ("tflite-int8", "tflite-int4")
    sessions = {name: edgelm.load(args.bundle, format=name, threads=args.threads) for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            rates[name].append(sessions[name].profile(max_new_tokens=args.new_tokens, repeats=1).decode_tok_s)
    rows = []
    for name in names:
        entry = manifest.artifact(name)
        rows.append(
            {
                "artifact": name,
                "megabytes": round(entry.bytes / 1e6, 1),
                "ppl_ratio": entry.parity["ppl_ratio"],
                "top1": entry.parity["top1_agreement"],
                "decode_tok_s_median": statistics.median(rates[name]),
                "decode_tok_s": rates[name],
            }
        )
    record = {
        "bundle_source": manifest.source.get("model_id"),
        "rows": rows,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "device": device_record() | {"memory_bandwidth_gb_s": bandwidth_gb_s()},
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
