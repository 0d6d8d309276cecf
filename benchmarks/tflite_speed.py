"""TFLite artifacts of one bundle in edgelm's LiteRT session and in LiteRT-LM's Engine (the
vendor runtime, on the .litertlm packed from the very same file): file size, parity (from the
manifest) and decode speed, interleaved round by round, with this machine's read bandwidth
measured in the same run.

    python benchmarks/tflite_speed.py BUNDLE --out benchmarks/results/tflite_speed.json

BUNDLE: an export with TFLite artifacts, e.g. `--formats tflite --quant int8,int4`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bandwidth_gb_s, parity_prompt

import edgelm
from edgelm.bundle import read_bundle
from edgelm.profile import device_record
from edgelm.vendors import bundle_facts, get_vendor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    manifest = read_bundle(args.bundle)
    entries = [a for a in manifest.artifacts if a.format == "tflite"]
    vendor = get_vendor("tflite")
    sessions = {a.name: edgelm.load(args.bundle, format=a.name, threads=args.threads) for a in entries}
    facts = {a.name: bundle_facts(args.bundle, a) for a in entries}
    rates: dict[str, dict[str, list[float]]] = {a.name: {"edgelm": [], "litert_lm": [], "tokens": []} for a in entries}
    prompt = parity_prompt(args.bundle / "tokenizer")
    for _ in range(args.rounds):  # interleaved: drift in machine speed hits every row alike
        for entry in entries:
            rates[entry.name]["edgelm"].append(
                sessions[entry.name].profile((prompt,), max_new_tokens=args.new_tokens, repeats=1).decode_tok_s
            )
            run = vendor.generate(
                args.bundle / entry.path, args.bundle, prompt, facts[entry.name], args.new_tokens, args.threads
            )
            rates[entry.name]["litert_lm"].append(run.decode_tok_s or 0.0)
            rates[entry.name]["tokens"].append(run.tokens)
    rows = []
    for entry in entries:
        runs = rates[entry.name]
        rows.append(
            {
                "artifact": entry.name,
                "megabytes": round(entry.bytes / 1e6, 1),
                "ppl_ratio": entry.parity["ppl_ratio"],
                "top1": entry.parity["top1_agreement"],
                "vendor_check": [r["result"] for r in entry.vendor_runtimes],
                "edgelm_decode_tok_s_median": statistics.median(runs["edgelm"]),
                "edgelm_decode_tok_s": runs["edgelm"],
                "litert_lm_decode_tok_s_median": statistics.median(runs["litert_lm"]),
                "litert_lm_decode_tok_s": runs["litert_lm"],
                "litert_lm_tokens": runs["tokens"],
            }
        )
    record = {
        "bundle_source": manifest.source.get("model_id"),
        "rows": rows,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "prompt": prompt,
        "how": "the parity prompt for both; edgelm: its profile (EOS ignored); "
        "LiteRT-LM: Engine + Session on CPU, float32 activations, "
        "greedy, its own loop and tokenizer, decode = tokens after the first / time after the first "
        "(it stops at the model's stop tokens: litert_lm_tokens says how many it made)",
        "device": device_record() | {"memory_bandwidth_gb_s": bandwidth_gb_s()},
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
