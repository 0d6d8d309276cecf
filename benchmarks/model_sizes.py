"""The android preset at the sizes people ship: the default 135M model and random-weight models
at Qwen2.5-0.5B, Llama-3.2-1B and Gemma-3-1B shapes (edgelm.shapes), each exported with
`edgelm export --target android`, one after another, on this machine.

    python benchmarks/model_sizes.py --work /tmp/sizes --out benchmarks/results/model_sizes.json
    python benchmarks/model_sizes.py --table benchmarks/results/model_sizes.json   # the README table

Per model: wall time, the export's peak RSS (its own and each background worker's, from the
bundle's step table) against 2.5x the fp32 weight bytes, the slowest step, and per artifact:
file size, parity (ppl ratio; for random weights the logit measures — mean KL, top-1
agreement — are what count), decode tok/s from the export's profile and its fraction of the
bandwidth bound (read bandwidth measured in the same run ÷ file bytes: decode reads every
weight once per token). `--work` keeps models and bundles: a re-run reads an unchanged bundle
back in seconds (`--profile-again WHY` measures a kept bundle's decode speeds again). Each
model's row carries the read bandwidth measured right after its own export (or profile), and a
run merges its rows into the `--out` file already there (a model's row is replaced), so a table
too long for one sitting is filled one shape at a time, each row beside the bandwidth of its
own run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import read_bandwidth_gb_s

from edgelm.bundle import read_bundle
from edgelm.profile import device_record

DEFAULT = "smollm2-135m"  # the bundled default model (real weights)
RSS_BUDGET = 2.5  # the export's peak RSS, in fp32 weight bytes


def model_folder(work: Path, name: str) -> Path | None:
    """The model to export for `name` (written on first use); None for the default model."""
    if name == DEFAULT:
        return None
    folder = work / name
    if not folder.exists():
        from edgelm.shapes import write_shape

        tokenizer = work / "tokenizer"
        if not tokenizer.exists():
            from edgelm.model import inspect_source, load_reference_model

            load_reference_model(inspect_source(None), tokenizer)
        print(f"writing {name} to {folder}", flush=True)
        write_shape(name, folder, tokenizer)
    return folder


def export(work: Path, name: str, extra: list[str]) -> dict[str, Any]:
    folder = model_folder(work, name)
    bundle = work / f"{name}-android"
    command = [sys.executable, "-m", "edgelm", "export", *([str(folder)] if folder else []), "--target", "android"]
    command += ["-o", str(bundle), "--repeats", "1", "--new-tokens", "64", *extra]
    if folder:
        # Random weights give near-uniform logits, where two runtimes' greedy picks part on a
        # rounding-level tie (a 0.5B export was lost to that after 71 minutes): the vendor
        # runtimes' verdicts stay in the manifest instead of failing the export.
        command.append("--allow-vendor-mismatch")
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"model": name, "command": " ".join(command[3:]), "failed": _failure(result), "wall_s": round(wall, 1)}
    manifest = read_bundle(bundle)
    reference = next(a for a in manifest.artifacts if a.name == "reference-fp32")
    steps = manifest.export_steps
    peaks = [s["peak_rss_mb"] for s in steps if s.get("peak_rss_mb") is not None]
    slowest = max((s for s in steps if s.get("depth", 0) == 0), key=lambda s: s["seconds"])  # not a phase inside one
    return {
        "model": name,
        "command": " ".join(command[3:]),
        "parameters": manifest.source.get("num_parameters"),
        "fp32_weight_mb": reference.bytes / 1e6,
        "wall_s": round(wall, 1),
        "export_peak_rss_mb": max(peaks) if peaks else None,
        "rss_budget_mb": RSS_BUDGET * reference.bytes / 1e6,
        "slowest_step": {"step": slowest["step"], "seconds": slowest["seconds"]},
        "skipped": manifest.reference.get("skipped_formats", {}),
        "export_steps": steps,
        "artifacts": [
            {
                "artifact": a.name,
                "mb": a.bytes / 1e6,
                "ppl_ratio": a.parity.get("ppl_ratio"),
                "mean_kl": a.parity.get("mean_kl"),
                "top1_agreement": a.parity.get("top1_agreement"),
                "max_abs_logit_diff": a.parity.get("max_abs_logit_diff_first_window"),
                "passed": a.parity.get("passed"),
                "decode_tok_s": (a.profile or {}).get("decode_tok_s"),
                "vendor_runtimes": [r["result"] for r in a.vendor_runtimes],
            }
            for a in manifest.artifacts
        ],
    }


def profile_again(work: Path, model: dict[str, Any], threads: int, why: str) -> dict[str, Any]:
    """`model`'s row with every artifact's decode speed measured again on its kept bundle (`edgelm
    profile`, the export's settings: 64 new tokens, one run after a warm-up) and the read bandwidth
    measured right after, for an export whose own profiles ran beside other work. The export's
    figures stay in the row (`export_profile_decode_tok_s`, `export_read_bandwidth_gb_s`)."""
    bundle = work / f"{model['model']}-android"
    out = work / f"{model['model']}-profile.json"
    command = [sys.executable, "-m", "edgelm", "profile", str(bundle), "--new-tokens", "64", "--repeats", "1"]
    subprocess.run([*command, "--threads", str(threads), "--json", str(out)], check=True, capture_output=True)
    profiles = json.loads(out.read_text())
    bandwidth = read_bandwidth_gb_s(threads)
    first = "export_read_bandwidth_gb_s" not in model  # a second re-profile keeps the export's own figures
    for artifact in model["artifacts"]:
        if first:
            artifact["export_profile_decode_tok_s"] = artifact["decode_tok_s"]
        artifact["decode_tok_s"] = profiles[artifact["artifact"]]["decode_tok_s"]
    if first:
        model["export_read_bandwidth_gb_s"] = model["read_bandwidth_gb_s"]
    model["read_bandwidth_gb_s"] = bandwidth
    model["decode_profiled_again"] = {"why": why, "command": " ".join(command[3:]), "commit": commit()}
    return model


def _failure(result: subprocess.CompletedProcess) -> dict[str, Any]:
    """How an export ended that did not finish: its exit status or signal (SIGKILL is most often
    the kernel's out-of-memory killer), the last steps it finished and its last error line."""
    import signal

    steps = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.lstrip().startswith("✓")]
    errors = [line.strip() for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
    code = result.returncode
    return {
        "exit": signal.Signals(-code).name if code < 0 else code,
        "last_finished_steps": steps[-3:],
        "last_error_line": errors[-1] if errors else None,
    }


def commit() -> str:
    """The edgelm commit this run measured (and whether files had changed since)."""
    here = Path(__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True)
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def table(record: dict[str, Any]) -> str:
    """The README's table: decode and size per format and model (smallest first), with the share of the bound."""
    models = sorted(record["models"], key=lambda m: m.get("parameters") or 0)
    lines = [
        f"Read bandwidth ({record['threads']} threads) measured right after each model's export, in the same "
        "run (after its decode speeds were measured again, where they were: `decode_profiled_again` in the "
        "JSON says why); bound = bandwidth ÷ file bytes (decode reads every weight once per token).",
        "",
        "| model | artifact | MB | decode tok/s | read GB/s | share of bound | ppl ratio | mean KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        if "failed" in model:
            lines.append(f"| {model['model']} | export failed: {' '.join(model['failed'])[:120]} | | | | | | |")
            continue
        bandwidth = model["read_bandwidth_gb_s"]
        for a in model["artifacts"]:
            speed = a["decode_tok_s"] or 0.0
            share = speed / (bandwidth * 1e9 / (a["mb"] * 1e6))
            lines.append(
                f"| {model['model']} | {a['artifact']} | {a['mb']:.0f} | {speed:.1f} | {bandwidth} | {share:.0%} "
                f"| {a['ppl_ratio']:.4f} | {a['mean_kl']:.4f} |"
            )
    lines += ["", "| model | parameters | export wall | peak RSS (budget 2.5× fp32) | slowest step | left out |"]
    lines.append("|---|---|---|---|---|---|")
    for model in models:
        if "failed" in model:
            continue
        peak, budget = model["export_peak_rss_mb"] or 0, model["rss_budget_mb"]
        left_out = ", ".join(model["skipped"]) or "none"
        slowest = model["slowest_step"]
        lines.append(
            f"| {model['model']} | {model['parameters'] / 1e6:,.0f}M | {model['wall_s'] / 60:.1f} min "
            f"| {peak:,.0f} MB of {budget:,.0f} | {slowest['step']} ({slowest['seconds']:.0f} s) | {left_out} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="models and bundles are written (and kept) here")
    parser.add_argument("--out", type=Path, help="the JSON result")
    parser.add_argument("--models", default=f"{DEFAULT},qwen2.5-0.5b,llama-3.2-1b,gemma-3-1b-like")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", type=Path, help="print the README table of a stored result and stop")
    parser.add_argument(
        "--profile-again",
        metavar="WHY",
        help="do not export: measure the decode speed of the kept bundles of --models again (and the "
        "bandwidth after), e.g. when something else ran beside the export's own profiles; WHY is recorded",
    )
    args, extra = parser.parse_known_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if not (args.work and args.out):
        parser.error("--work and --out are needed to run")
    args.work.mkdir(parents=True, exist_ok=True)
    record = json.loads(args.out.read_text()) if args.out.exists() else {"models": [], "threads": args.threads}
    if record["threads"] != args.threads:
        parser.error(f"{args.out} was measured with {record['threads']} threads; write another file")
    if args.profile_again:
        rows = {m["model"]: m for m in record["models"] if "failed" not in m}
        for name in args.models.split(","):
            if name not in rows or not (args.work / f"{name}-android").is_dir():
                parser.error(f"no exported {name} in {args.out} with its bundle in {args.work}: export it first")
            profile_again(args.work, rows[name], args.threads, args.profile_again)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(table(record))
        return
    for name in args.models.split(","):
        model = export(args.work, name, extra)
        model["read_bandwidth_gb_s"] = read_bandwidth_gb_s(args.threads)  # this machine, now
        model["device"] = device_record()
        model["commit"] = commit()  # rows of one file can come from different runs
        print(json.dumps({k: v for k, v in model.items() if k not in ("export_steps", "artifacts")}), flush=True)
        record["models"] = [m for m in record["models"] if m["model"] != name] + [model]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")  # after each model: a long run keeps what it did
    print(table(record))


if __name__ == "__main__":
    main()
