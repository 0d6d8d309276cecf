"""What each pruning method does to the exported file size and to perplexity (default model).

Unstructured (L1) and 2:4 sparsity zero weights but leave every matrix its shape, so the
exported file is as large as the dense one; structured pruning (MLP channels, attention
head groups) really removes rows and columns. Each pruned model is exported to GGUF Q8_0
(edgelm's ordinary export path, parity measured against the pruned fp32 model) and to
safetensors.

    python benchmarks/prune_sizes.py --out benchmarks/results/prune_sizes_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from edgelm.compress.pipeline import compress_model
from edgelm.compress.recipe import CompressRecipe, Prune
from edgelm.export import ExportOptions, export_bundle
from edgelm.parity import ParitySettings
from edgelm.profile import device_record

METHODS = {
    "l1 50%": Prune("l1", 0.5),
    "2:4": Prune("2:4"),
    "channels 25%": Prune("channels", 0.25),
    "heads 1 of 3 groups": Prune("heads", 0.34),
}


def export_size(source: Path | None, bundle: Path) -> dict:
    options = ExportOptions(
        formats=("gguf",),
        quants=("int8",),
        profile=False,
        allow_drift=True,
        overwrite=True,
        parity=ParitySettings(max_tokens=2048),
    )
    manifest = export_bundle(source, bundle, options)
    gguf = next(a for a in manifest.artifacts if a.format == "gguf")
    reference = next(a for a in manifest.artifacts if a.format == "safetensors")
    row = {
        "gguf_q8_0_mb": round(gguf.bytes / 1e6, 2),
        "safetensors_fp32_mb": round(reference.bytes / 1e6, 2),
        "parity_ppl_fp32": round(reference.parity["perplexity"], 4),
        "gguf_q8_0_ppl_ratio": round(gguf.parity["ppl_ratio"], 4),
    }
    shutil.rmtree(bundle)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prune_sizes_smollm2.json"))
    parser.add_argument("--work", type=Path, default=Path("dist/prune-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = {"dense": export_size(None, args.work / "bundle-dense")}
    for name, prune in METHODS.items():
        folder = args.work / name.replace(" ", "-").replace("%", "").replace(":", "of")
        record = compress_model(None, folder, CompressRecipe(prune=prune), overwrite=True)
        step = record.steps[0]
        rows[name] = {
            "heldout_ppl_base": record.perplexity["base"],
            "heldout_ppl_pruned": record.perplexity["after_prune"],
            "parameters": record.parameters["after"],
            "sparsity_reached": step.get("sparsity_reached"),
            "shrinks_files": step["shrinks_files"],
            **export_size(folder, args.work / "bundle"),
        }
        args.out.write_text(
            json.dumps({"model": "SmolLM2-135M-Instruct", "device": device_record(), "rows": rows}, indent=2) + "\n"
        )
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
