"""Quantization on weights that are not on a 4-bit grid: the default model and its off-grid
twins (edgelm.twins), exported to every format at int8 and int4, with and without
calibration, parity measured as in every export (the parity text; calibration never reads it).

    python benchmarks/offgrid_quant.py --out benchmarks/results/offgrid_quant.json

With `--work DIR` the twins and bundles are kept there: running the same command again reads
every bundle back in seconds (an unchanged export is up to date), so a long run's figures can
be re-read or extended one twin at a time.

Each row: twin, calibration on/off, artifact, the recipe that was kept, ppl ratio, top-1,
KL, and the ladder of recipes tried. `--allow-drift` semantics: an artifact whose every
recipe misses its gate is still kept (and measured), so the table shows how far it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bandwidth_gb_s

from edgelm.export import ExportOptions, export_bundle
from edgelm.parity import ParitySettings
from edgelm.profile import device_record

TWINS = {"default": None, "mild": ("rescaled", 2.0), "hard": ("rescaled", 4.0), "finetuned": ("finetuned", 0.0)}


def build_twins(names: list[str], scratch: Path) -> dict[str, Path | None]:
    from edgelm.compress.pipeline import TextSplits
    from edgelm.model import inspect_source, load_reference_model
    from edgelm.tokenizer import Tokenizer
    from edgelm.twins import make_twin, save_twin

    folders: dict[str, Path | None] = {}
    source = inspect_source(None)
    for name in names:
        if TWINS[name] is None:
            folders[name] = None  # the default model itself
            continue
        folders[name] = scratch / f"smollm2-{name}"
        if (folders[name] / "config.json").is_file():  # made by an earlier run in the same --work folder
            continue
        kind, strength = TWINS[name]
        model = load_reference_model(source, scratch / "tokenizer")
        train = TextSplits.build(Tokenizer(scratch / "tokenizer")).train if kind == "finetuned" else None
        record = make_twin(model, kind, strength=strength or 2.0, seed=1, train_ids=train)
        save_twin(model, scratch / "tokenizer", folders[name], record)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twins", default="default,mild,hard")
    parser.add_argument(
        "--exports",
        default="onnx,gguf,executorch,tflite:int8,int4",
        help="exports per twin: FORMATS:QUANTS, separated by ';'",
    )
    parser.add_argument("--calibration", default="on,off", help="on, off or on,off")
    parser.add_argument("--parity-tokens", type=int, default=ParitySettings().max_tokens)
    parser.add_argument("--work", type=Path, help="keep twins and bundles here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/offgrid_quant.json"))
    args = parser.parse_args()
    rows = []
    report = {
        "device": device_record() | {"memory_bandwidth_gb_s": bandwidth_gb_s()},
        "rows": rows,
        "how": f"benchmarks/offgrid_quant.py --twins {args.twins} --exports '{args.exports}' "
        f"--calibration {args.calibration} --parity-tokens {args.parity_tokens}",
    }
    with contextlib.ExitStack() as stack:
        if args.work:
            args.work.mkdir(parents=True, exist_ok=True)
        scratch = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgelm-offgrid-")))
        folders = build_twins(args.twins.split(","), scratch)
        for twin, folder in folders.items():
            for calibration, export in [(c, e) for c in args.calibration.split(",") for e in args.exports.split(";")]:
                formats, quants = export.split(":")
                options = ExportOptions(
                    formats=tuple(formats.split(",")),
                    quants=tuple(quants.split(",")),
                    allow_drift=True,
                    profile=False,
                    calibrate=calibration == "on",
                    parity=ParitySettings(max_tokens=args.parity_tokens),
                )
                start = time.time()
                manifest = export_bundle(folder, scratch / f"bundle-{twin}-{calibration}-{len(rows)}", options)
                seconds = round(time.time() - start, 1)
                for entry in manifest.artifacts[1:]:  # the reference is 1.0 by definition
                    parity = entry.parity or {}
                    row = {
                        "twin": twin,
                        "calibration": calibration,
                        "artifact": entry.name,
                        "kept": entry.quant,
                        "ppl_ratio": round(parity.get("ppl_ratio", 0), 4),
                        "top1": round(parity.get("top1_agreement", 0), 4),
                        "kl": round(parity.get("mean_kl", 0), 5),
                        "passed": parity.get("passed"),
                        "attempts": (entry.recipe or {}).get("attempts"),
                        "export_s": seconds,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(
                    json.dumps(report, indent=2) + "\n"
                )  # after every export: a long run keeps its rows


if __name__ == "__main__":
    main()
