"""Soak: 10,000 generations through one loaded model per format; RSS growth and open file
descriptors must stay flat (RSS growth < 50 MB, no fd growth).

The model is a tiny random Llama exported to every installed format (built here from a
config, no downloads), so the run measures edgelm's and the runtimes' per-call leaks, not
the model's size. RSS is read after 200 warm-up generations and again at the end.

    python benchmarks/soak.py --generations 10000 --out benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import build_tiny_model

import edgelm
from edgelm.bundle import read_bundle
from edgelm.export import ExportOptions, export_bundle
from edgelm.parity import ParitySettings
from edgelm.profile import device_record

WARMUP = 200
PROMPTS = ("The parity text", "What is a KV cache?", "Edge devices", "A", "Tell me a story about a phone")
RSS_LIMIT_MB = 50


def soak(bundle: Path, name: str, generations: int, new_tokens: int) -> dict:
    process = psutil.Process()
    lm = edgelm.load(bundle, format=name, threads=1)
    for i in range(WARMUP):
        lm.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens, temperature=0.8, seed=i)
    rss_before, fds_before = process.memory_info().rss, process.num_fds()
    started = time.monotonic()
    for i in range(generations):
        lm.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens, temperature=0.8, seed=i)
    seconds = time.monotonic() - started
    rss_after, fds_after = process.memory_info().rss, process.num_fds()
    lm.close()
    growth = (rss_after - rss_before) / 1e6
    return {
        "artifact": name,
        "generations": generations,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 1),
        "rss_before_mb": round(rss_before / 1e6, 1),
        "rss_after_mb": round(rss_after / 1e6, 1),
        "rss_growth_mb": round(growth, 2),
        "fds_before": fds_before,
        "fds_after": fds_after,
        "passed": growth < RSS_LIMIT_MB and fds_after <= fds_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=10_000)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgelm-soak-") as tmp:
        model = build_tiny_model("llama", Path(tmp) / "model")
        bundle = Path(tmp) / "bundle"
        export_bundle(
            model, bundle, ExportOptions(parity=ParitySettings(max_tokens=256, window=64, stride=64), profile=False)
        )
        seen_formats = set()
        for entry in read_bundle(bundle).artifacts:  # one artifact per format
            if entry.format in seen_formats:
                continue
            seen_formats.add(entry.format)
            rows.append(soak(bundle, entry.name, args.generations, args.new_tokens))
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "device": device_record(),
        "rss_limit_mb": RSS_LIMIT_MB,
        "all_passed": all(r["passed"] for r in rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"all passed: {report['all_passed']}")


if __name__ == "__main__":
    main()
