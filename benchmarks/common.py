"""Shared by the decode benchmarks: edgelm's runtime vs a minimal loop written directly
against the same runtime, on the same file, interleaved so that drift hits both alike."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import edgelm
from edgelm.bundle import read_bundle
from edgelm.profile import DEFAULT_PROMPTS, device_record


def bandwidth_gb_s(megabytes: int = 512, repeats: int = 5) -> float:
    """This machine's memory bandwidth now: the best of `repeats` copies of a `megabytes` array
    (bytes read + written per second). Machines of one kind differ several-fold, so every
    benchmark records it beside its figures."""
    import time

    src = np.ones(megabytes << 17, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return round(2 * src.nbytes / best / 1e9, 2)


def read_bandwidth_gb_s(threads: int = 2, megabytes: int = 1024, repeats: int = 25, reduce: str = "max") -> float:
    """This machine's read bandwidth now with `threads` threads: the best of `repeats` passes that
    take the maximum of a `megabytes` array, split between the threads (numpy releases the GIL in
    its loops). Decode of a model reads every weight byte once per token, so this over the bytes
    per token bounds tokens per second: from memory when the array is bigger than the caches (the
    default), from the last-level cache when it is the size of a model that fits there.

    `max` rather than `sum`: numpy's pairwise float summation is compute-bound below what memory
    delivers (on a 2-core Intel Xeon: 16.7 GB/s summing a 1 GB array, 33.6 GB/s taking its maximum;
    benchmarks/kernel_facts.py), so the bound it gave was about half the real one (benchmark results
    before this change). The best of 25 passes rather than 5: over arrays a shared last-level
    cache may hold, 5 passes left the figure wandering between calls by up to a half (a pass
    that a neighbour's work on the VM slowed down). `reduce` names the numpy reduction a pass runs
    (kernel_facts.py compares "sum" with "max")."""
    import threading
    import time

    data = np.ones(megabytes << 18, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=getattr(part, reduce)) for part in parts]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return round(data.nbytes / best / 1e9, 2)


# (artifact path, prompt ids, new tokens, threads) -> decode tok/s of a loop written directly against a runtime
DirectLoop = Callable[[Path, list[int], int, int], float]


def arguments(description: str, default_out: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def compare_decode(args: argparse.Namespace, fmt: str, loops: dict[str, DirectLoop]) -> None:
    """For every `fmt` artifact of the bundle: edgelm `profile` vs each direct loop (by name),
    best and median of `repeats` interleaved rounds after a warm-up, plus size and parity.
    Writes args.out (JSON)."""
    manifest = read_bundle(args.bundle)
    rows: list[dict[str, Any]] = []
    for entry in [a for a in manifest.artifacts if a.format == fmt]:
        lm = edgelm.load(args.bundle, format=entry.name, threads=args.threads, verify=False)
        prompt_ids = lm.tokenizer.encode(DEFAULT_PROMPTS[0])
        path = args.bundle / entry.path
        for loop in loops.values():
            loop(path, prompt_ids, 8, args.threads)  # warm-up
        profiles, rates = [], {name: [] for name in loops}
        for _ in range(args.repeats):  # interleaved, so that drift in machine speed hits every loop alike
            profiles.append(lm.profile(max_new_tokens=args.new_tokens, repeats=1))
            for name, loop in loops.items():
                rates[name].append(loop(path, prompt_ids, args.new_tokens, args.threads))
        lm.close()
        best = max(profiles, key=lambda p: p.decode_tok_s)
        ours = [p.decode_tok_s for p in profiles]
        parity = entry.parity or {}
        row = {
            "artifact": entry.name,
            "quant": entry.quant,
            "bytes": entry.bytes,
            "edgelm_decode_tok_s_runs": ours,
            "edgelm_decode_tok_s_best": best.decode_tok_s,
        }
        for name, runs in rates.items():
            row |= {
                f"{name}_decode_tok_s_runs": runs,
                f"{name}_decode_tok_s_best": max(runs),
                f"edgelm_vs_{name}": best.decode_tok_s / max(runs),
                f"edgelm_vs_{name}_median": float(np.median(ours) / np.median(runs)),
            }
        rows.append(
            row
            | {
                "ttft_s": best.ttft_s,
                "prefill_tok_s": best.prefill_tok_s,
                "peak_rss_mb": best.peak_rss_mb,
                "ppl": parity.get("perplexity"),
                "ppl_ratio": parity.get("ppl_ratio"),
                "top1": parity.get("top1_agreement"),
                "kl": parity.get("mean_kl"),
            }
        )
        print(json.dumps(rows[-1]))
    by_quant = {r["quant"]: r for r in rows}
    summary = {}
    for quant, row in by_quant.items():  # each recipe's size and decode speed relative to fp32
        if quant != "fp32" and "fp32" in by_quant:
            summary |= {
                f"{quant}_size_vs_fp32": row["bytes"] / by_quant["fp32"]["bytes"],
                f"{quant}_decode_vs_fp32": row["edgelm_decode_tok_s_best"]
                / by_quant["fp32"]["edgelm_decode_tok_s_best"],
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "bundle": str(args.bundle),
                "model": manifest.source["model_id"],
                "new_tokens": args.new_tokens,
                "threads": args.threads,
                "repeats": args.repeats,
                "device": device_record(),
                "rows": rows,
                "summary": summary,
            },
            indent=2,
        )
        + "\n"
    )
    print(json.dumps(summary))


def parity_prompt(tokenizer_dir: Path) -> str:
    """The export's greedy-check prompt: the parity text's first GREEDY_PROMPT_TOKENS tokens, as
    text (real text the model continues; an instruction-tuned model stops at once after an
    unformatted question, and LiteRT-LM's runner cannot ignore a stop token)."""
    from edgelm.parity import GREEDY_PROMPT_TOKENS, parity_text
    from edgelm.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)
    return tokenizer.decode(tokenizer.encode(parity_text())[:GREEDY_PROMPT_TOKENS])


def write_result(args: argparse.Namespace, manifest: Any, record: dict[str, Any]) -> None:
    """args.out (JSON): what every decode benchmark records first (the bundle, model, token
    counts, threads, rounds), then `record`."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = {"bundle": str(args.bundle), "model": manifest.source["model_id"], "new_tokens": args.new_tokens}
    header |= {"threads": args.threads, "repeats": args.repeats}
    args.out.write_text(json.dumps(header | record, indent=2) + "\n")


def print_and_save(report: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark's JSON and write it to `out` when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")
