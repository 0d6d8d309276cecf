"""The vendors' LLM runtimes on edgelm's files, beside edgelm's own runtime — one run, one prompt,
the same threads.

For every decoder artifact of a bundle that has a vendor runtime (edgelm.vendors): the vendor
check repeated with this code (the bundle is left as it is), then decode tok/s of that runtime's
own loop (TextLLMRunner, og.Generator, llama.cpp's Llama, LiteRT-LM) and of edgelm's runtime on
the same file, 5 interleaved rounds. The peer tools' own artifacts are benchmarks/peers.py's.

    python benchmarks/vendor_runtimes.py dist/smollm2 --out benchmarks/results/vendor_runtimes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import bandwidth_gb_s, parity_prompt, read_bandwidth_gb_s, write_result

import edgelm
from edgelm.bundle import read_bundle
from edgelm.profile import device_record
from edgelm.tokenizer import Tokenizer
from edgelm.vendors import generation_facts, get_vendor
from edgelm.vendors.check import check_artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vendor_runtimes.json"))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    manifest = read_bundle(args.bundle)
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.bundle / "reference")
    facts = generation_facts(args.bundle / "tokenizer", config)
    entries = [a for a in manifest.artifacts if get_vendor(a.format) is not None]
    sessions = {a.name: edgelm.load(args.bundle, format=a.name, threads=args.threads, verify=False) for a in entries}
    # the export's check, repeated here with this code: the parity prompt, 64 greedy tokens
    tokenizer = Tokenizer(args.bundle / "tokenizer")
    prompt = parity_prompt(args.bundle / "tokenizer")  # speed on the same prompt (common.parity_prompt says why)
    checks = {
        a.name: check_artifact(
            a.format,
            args.bundle / a.path,
            args.bundle,
            lambda a=a: edgelm.load(args.bundle, format=a.name, threads=args.threads, verify=False).session(),
            tokenizer,
            facts,
            prompt,
            args.threads,
            write_files=False,
        )
        for a in entries
    }
    for name, check in checks.items():
        print(name, check.result, flush=True)
    runs: dict[str, dict[str, list[float]]] = {a.name: {"vendor": [], "edgelm": []} for a in entries}
    for entry in entries:  # warm-up
        get_vendor(entry.format).generate(args.bundle / entry.path, args.bundle, prompt, facts, 8, args.threads)
    for round_ in range(args.repeats):  # interleaved: drift in machine speed hits every row alike
        for entry in entries:
            run = get_vendor(entry.format).generate(
                args.bundle / entry.path, args.bundle, prompt, facts, args.new_tokens, args.threads, ignore_eos=True
            )
            runs[entry.name]["vendor"].append(run.decode_tok_s or 0.0)
            runs[entry.name].setdefault("vendor_tokens", []).append(run.tokens)
            runs[entry.name]["edgelm"].append(
                sessions[entry.name].profile((prompt,), max_new_tokens=args.new_tokens, repeats=1).decode_tok_s
            )
        print(f"round {round_ + 1}/{args.repeats} done", flush=True)
    read_gb_s = read_bandwidth_gb_s(args.threads)
    rows = []
    for entry in entries:
        vendor, ours = runs[entry.name]["vendor"], runs[entry.name]["edgelm"]
        bound = read_gb_s * 1e9 / entry.bytes  # tok/s if every byte of the file were read once per token
        check = checks[entry.name]
        rows.append(
            {
                "artifact": entry.name,
                "bytes": entry.bytes,
                "vendor_runtime": check.runtime,
                "vendor_version": check.version,
                "vendor_check": check.result,
                "vendor_check_matching_tokens": check.matching_tokens,
                "vendor_check_text": check.vendor_text,
                "edgelm_check_text": check.edgelm_text,
                "ppl_ratio": (entry.parity or {}).get("ppl_ratio"),
                "vendor_decode_tok_s_runs": vendor,
                "vendor_decode_tok_s_median": statistics.median(vendor),
                "vendor_tokens": runs[entry.name]["vendor_tokens"],
                "edgelm_decode_tok_s_runs": ours,
                "edgelm_decode_tok_s_median": statistics.median(ours),
                "bandwidth_bound_tok_s": bound,
                "vendor_fraction_of_bound": statistics.median(vendor) / bound,
                "edgelm_fraction_of_bound": statistics.median(ours) / bound,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for session in sessions.values():
        session.close()
    write_result(
        args,
        manifest,
        {
            "prompt": prompt,
            "read_write_bandwidth_gb_s": bandwidth_gb_s(),
            "read_bandwidth_gb_s": read_gb_s,
            "bound": "read_bandwidth_gb_s (threads as decode, measured after the rounds) / file bytes: every "
            "weight byte read once per token (an upper estimate of the bytes: a table used only for lookup "
            "is read one row per token)",
            "device": device_record(),
            "rows": rows,
            "how": "the parity prompt for every row; vendor: the runtime's own loop on edgelm's file (decode "
            "= tokens after the first / time after the first; EOS ignored where the API allows, ExecuTorch's "
            "runner and LiteRT-LM stop at it: vendor_tokens counts); edgelm: edgelm's profile (EOS ignored); "
            "all interleaved per round",
        },
    )


if __name__ == "__main__":
    main()
