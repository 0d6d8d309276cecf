"""ONNX decode speed: edgelm's runtime vs a minimal hand-written onnxruntime loop, same files.

    python benchmarks/onnx_decode.py BUNDLE [--out benchmarks/results/onnx_smollm2.json]

For every ONNX artifact of the bundle: file size, edgelm `profile` (the shared generation
loop, IO-bound cache) and a plain greedy loop written directly against onnxruntime
(numpy feeds, `session.run`), same prompt, same token count, same threads, best of
`--repeats` interleaved rounds after a warm-up. Also records parity from the manifest. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import edgelm
from edgelm.bundle import read_bundle
from edgelm.profile import DEFAULT_PROMPTS, device_record


def hand_written_decode_tok_s(path: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> float:
    """The loop a user writes against onnxruntime directly: numpy in, numpy out."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_")]
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    out = session.run(None, {"input_ids": np.asarray([prompt_ids], np.int64), **empty})
    token = int(out[0][0, -1].argmax())
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        feeds = {"input_ids": np.asarray([[token]], np.int64), **{i.name: v for i, v in zip(past_inputs, out[1:])}}
        out = session.run(None, feeds)
        token = int(out[0][0, -1].argmax())
    return (new_tokens - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_smollm2.json"))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    manifest = read_bundle(args.bundle)
    rows = []
    for entry in [a for a in manifest.artifacts if a.format == "onnx"]:
        lm = edgelm.load(args.bundle, format=entry.name, threads=args.threads, verify=False)
        prompt_ids = lm.tokenizer.encode(DEFAULT_PROMPTS[0])
        hand_written_decode_tok_s(args.bundle / entry.path, prompt_ids, 8, args.threads)  # warm-up
        # Interleave the two loops so that drift in machine speed hits both alike.
        profiles, direct_rates = [], []
        for _ in range(args.repeats):
            profiles.append(lm.profile(max_new_tokens=args.new_tokens, repeats=1))
            direct_rates.append(hand_written_decode_tok_s(args.bundle / entry.path, prompt_ids, args.new_tokens,
                                                          args.threads))
        lm.close()
        profile = max(profiles, key=lambda p: p.decode_tok_s)
        direct = max(direct_rates)
        rows.append({
            "artifact": entry.name, "quant": entry.quant, "bytes": entry.bytes,
            "edgelm_decode_tok_s_runs": [p.decode_tok_s for p in profiles], "edgelm_decode_tok_s_best": profile.decode_tok_s,
            "hand_written_ort_decode_tok_s_runs": direct_rates,
            "hand_written_ort_decode_tok_s_best": direct,
            "edgelm_vs_hand_written": profile.decode_tok_s / direct,
            "edgelm_vs_hand_written_median": float(np.median([p.decode_tok_s for p in profiles]) / np.median(direct_rates)),
            "ttft_s": profile.ttft_s, "prefill_tok_s": profile.prefill_tok_s, "peak_rss_mb": profile.peak_rss_mb,
            "ppl": (entry.parity or {}).get("perplexity"), "ppl_ratio": (entry.parity or {}).get("ppl_ratio"),
            "top1": (entry.parity or {}).get("top1_agreement"), "kl": (entry.parity or {}).get("mean_kl"),
        })
        print(json.dumps(rows[-1]))
    by_quant = {r["quant"]: r for r in rows}
    summary = {}
    if "fp32" in by_quant and "int4" in by_quant:
        summary = {"int4_size_vs_fp32": by_quant["int4"]["bytes"] / by_quant["fp32"]["bytes"],
                   "int4_decode_vs_fp32": by_quant["int4"]["edgelm_decode_tok_s_best"] / by_quant["fp32"]["edgelm_decode_tok_s_best"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": str(args.bundle), "model": manifest.source["model_id"],
                                    "new_tokens": args.new_tokens, "threads": args.threads, "repeats": args.repeats,
                                    "device": device_record(), "rows": rows, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
