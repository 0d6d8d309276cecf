"""ONNX encoder profile at a real on-device embedding model's shape (all-MiniLM-L6-v2:
6 layers, hidden 384, 12 heads, 22.7 M parameters), measured the way its users measure it.

    python benchmarks/onnx_encoder.py [--out benchmarks/results/onnx_encoder_minilm_shape.json]

No encoder checkpoint can be downloaded here, so the weights are random (seeded) at that
shape, and the tokenizer is the tests' byte-level BPE trained on the parity text: the
compute per token, the file sizes and the memory are those of the real model; parity is
measured on the same real text as any export. Exports fp32/int8/int4 through
`edgelm.export.export_bundle`, then reads latency p50/p90 at 128 tokens, batch-8
throughput, peak RSS and size from the bundle's manifest. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from edgelm.export import ExportOptions, export_bundle
from edgelm.profile import device_record

MINILM_SHAPE = dict(
    vocab_size=30522,
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=12,
    max_position_embeddings=512,
)


def build_model(folder: Path) -> Path:
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import write_tokenizer

    torch.manual_seed(0)
    transformers.AutoModel.from_config(transformers.BertConfig(**MINILM_SHAPE)).eval().save_pretrained(str(folder))
    write_tokenizer(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_encoder_minilm_shape.json"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "minilm-shape")
        start = time.perf_counter()
        manifest = export_bundle(
            model,
            Path(tmp) / "bundle",
            ExportOptions(formats=("onnx",), quants=("fp32", "int8", "int4"), threads=args.threads),
        )
        export_s = time.perf_counter() - start
    rows = []
    for entry in manifest.artifacts:
        prof, parity = entry.profile or {}, entry.parity or {}
        rows.append(
            {
                "artifact": entry.name,
                "bytes": entry.bytes,
                "min_cosine": parity.get("min_cosine"),
                "max_abs_diff": parity.get("max_abs_diff"),
                "passed": parity.get("passed"),
                **{
                    k: prof.get(k)
                    for k in (
                        "sequence_length",
                        "batch",
                        "latency_p50_ms",
                        "latency_p90_ms",
                        "throughput_per_s",
                        "peak_rss_mb",
                        "load_s",
                    )
                },
            }
        )
    fp32 = next(r for r in rows if r["artifact"] == "onnx-fp32")
    result = {
        "benchmark": "onnx_encoder",
        "shape": MINILM_SHAPE,
        "parameters": manifest.source["num_parameters"],
        "threads": args.threads,
        "export_s": round(export_s, 1),
        "rows": rows,
        "size_ratio_vs_fp32": {r["artifact"]: r["bytes"] / fp32["bytes"] for r in rows},
        "peak_rss_scope": "the export process (it also holds the fp32 torch reference)",
        "device": device_record(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(
            f"{r['artifact']:15s} {r['bytes'] / 1e6:7.1f} MB  cos {r['min_cosine']:.5f}"
            f"  p50 {r['latency_p50_ms']:.2f} ms"
            f"  p90 {r['latency_p90_ms']:.2f} ms  b8 {r['throughput_per_s']:.1f}/s"
        )


if __name__ == "__main__":
    main()
