"""The vendors' LLM runtimes on edgelm's files, beside edgelm's own runtime, and onnxruntime-genai's
own model builder as the ONNX peer — one run, one prompt, the same threads.

For every decoder artifact of a bundle that has a vendor runtime (edgelm.vendors): decode tok/s
of that runtime's own loop (TextLLMRunner, og.Generator, llama.cpp's Llama) and of edgelm's
runtime on the same file, 5 interleaved rounds. Then the peer: `python -m
onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu` on the bundle's own fp32 reference
(plus `algo_config=k_quant_mixed`, and the builder's closest match to edgelm's int4 recipe:
asymmetric blocks of 32 with an 8-bit output head), each measured for size, decode tok/s in
og.Generator (interleaved with the rest) and perplexity ratio on edgelm's parity text (the same
512-token windows over the first 4,096 tokens, against the reference perplexity in the manifest).

    python benchmarks/vendor_runtimes.py dist/smollm2 --out benchmarks/results/vendor_runtimes.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import bandwidth_gb_s, read_bandwidth_gb_s

import edgelm
from edgelm.bundle import read_bundle
from edgelm.parity import (
    GREEDY_PROMPT_TOKENS,
    ParitySettings,
    _log_softmax,
    parity_text,
)
from edgelm.profile import device_record
from edgelm.tokenizer import Tokenizer
from edgelm.vendors import generation_facts, get_vendor
from edgelm.vendors.check import check_artifact

PEERS = {  # name -> the builder's --extra_options
    "genai-builder-int4": [],
    "genai-builder-int4-k_quant_mixed": ["algo_config=k_quant_mixed"],
    # asymmetric with the shared (tied) table fails to load in 0.18.0: "Type (tensor(uint8)) of output arg
    # (/model/embed_tokens/Reshape/output_0) ... does not match expected type (tensor(float))"
    "genai-builder-int4-asym-head8": [
        "is_symmetric=false",
        "block_size=32",
        "matmul_mixed_precision=last_matmul:int8",
        "shared_embeddings=false",
    ],
}


def build_peer(hf: Path, out: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf),
        "-o",
        str(out),
        "-p",
        "int4",
        "-e",
        "cpu",
        "-c",
        str(out.parent / "cache"),
    ] + (["--extra_options", *extra] if extra else [])
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def genai_perplexity(folder: Path, ids: list[int], threads: int) -> float:
    import onnxruntime_genai as og

    from edgelm.vendors.onnxruntime_genai import open_model

    model = open_model(folder, threads)
    nll, scored = 0.0, 0
    for chunk in ParitySettings().windows(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(chunk) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(chunk, dtype=np.int32))
        logp = _log_softmax(generator.get_output("logits")[0, :-1])
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        scored += len(chunk) - 1
        del generator
    return float(np.exp(nll / scored))


def genai_decode(folder: Path, prompt: str, new_tokens: int, threads: int) -> tuple[float, int]:
    """og.Generator's decode tok/s with `new_tokens` forced (min_length: it would stop at EOS)."""
    import onnxruntime_genai as og

    from edgelm.vendors.onnxruntime_genai import open_model

    model = open_model(folder, threads)
    ids = og.Tokenizer(model).encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    generator.generate_next_token()  # the first token ends prefill
    start, n = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        n += 1
    return n / (time.perf_counter() - start), n + 1


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vendor_runtimes.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgelm-vendor-bench"))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    manifest = read_bundle(args.bundle)
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.bundle / "reference")
    facts = generation_facts(args.bundle / "tokenizer", config)
    entries = [a for a in manifest.artifacts if get_vendor(a.format) is not None]
    sessions = {a.name: edgelm.load(args.bundle, format=a.name, threads=args.threads, verify=False) for a in entries}
    # the export's check, repeated here with this code: the parity prompt, 64 greedy tokens
    tokenizer = Tokenizer(args.bundle / "tokenizer")
    parity_prompt = tokenizer.decode(tokenizer.encode(parity_text())[:GREEDY_PROMPT_TOKENS])
    # speed on the same prompt: real text the model continues (LiteRT-LM cannot ignore a stop token, and an
    # instruction-tuned model stops at once after an unformatted question)
    prompt = parity_prompt
    checks = {
        a.name: check_artifact(
            a.format,
            args.bundle / a.path,
            args.bundle,
            sessions[a.name].session(),
            tokenizer,
            facts,
            parity_prompt,
            args.threads,
        )
        for a in entries
    }
    for name, check in checks.items():
        print(name, check.result, flush=True)
    runs: dict[str, dict[str, list[float]]] = {a.name: {"vendor": [], "edgelm": []} for a in entries}
    peers: dict[str, dict[str, Any]] = {}
    if not args.no_peers:
        hf = args.work / "hf"
        shutil.rmtree(args.work, ignore_errors=True)
        hf.mkdir(parents=True)
        for source in [*(args.bundle / "reference").iterdir(), *(args.bundle / "tokenizer").iterdir()]:
            shutil.copyfile(source, hf / source.name)
        ids = Tokenizer(args.bundle / "tokenizer").encode(parity_text())[: ParitySettings().max_tokens]
        reference_ppl = next(a.parity["reference_perplexity"] for a in entries if a.parity)
        for name, extra in PEERS.items():
            folder = args.work / name
            seconds = build_peer(hf, folder, extra)
            ppl = genai_perplexity(folder, ids, args.threads)
            peers[name] = {
                "extra_options": extra,
                "build_s": round(seconds, 1),
                "bytes": folder_bytes(folder),
                "ppl": ppl,
                "ppl_ratio": ppl / reference_ppl,
                "decode_tok_s_runs": [],
            }
            print(json.dumps({name: peers[name]}), flush=True)
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
        for name, peer in peers.items():
            rate, _ = genai_decode(args.work / name, prompt, args.new_tokens, args.threads)
            peer["decode_tok_s_runs"].append(rate)
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
    for peer in peers.values():
        peer["decode_tok_s_median"] = statistics.median(peer["decode_tok_s_runs"])
        peer["fraction_of_bound"] = peer["decode_tok_s_median"] * peer["bytes"] / (read_gb_s * 1e9)
    for session in sessions.values():
        session.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "bundle": str(args.bundle),
                "model": manifest.source["model_id"],
                "prompt": prompt,
                "new_tokens": args.new_tokens,
                "threads": args.threads,
                "repeats": args.repeats,
                "read_write_bandwidth_gb_s": bandwidth_gb_s(),
                "read_bandwidth_gb_s": read_gb_s,
                "bound": "read_bandwidth_gb_s (threads as decode, measured after the rounds) / file bytes: every "
                "weight byte read once per token (an upper estimate of the bytes: a table used only for lookup "
                "is read one row per token)",
                "device": device_record(),
                "rows": rows,
                "peers": peers,
                "how": "the parity prompt for every row; vendor: the runtime's own loop on edgelm's file (decode "
                "= tokens after the first / time after the first; EOS ignored where the API allows, ExecuTorch's "
                "runner and LiteRT-LM stop at it: vendor_tokens counts); edgelm: edgelm's profile (EOS ignored); "
                "peers: "
                "og.Generator with min_length forcing new_tokens; all interleaved per round",
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
