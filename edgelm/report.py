"""Reports: one row per artifact (parity + profile) as JSON, Markdown, HTML and PNG plots.

Decoders and encoders are measured differently, so each has a `ReportLayout` (columns,
plots, model-card table), picked by the bundle's task.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.bundle import Manifest
from edgelm.vendors.near_ties import TIE_MARGIN


@dataclass(frozen=True)
class ReportLayout:
    """What a report shows for one kind of model: columns, plots, and the model card's table."""

    columns: list[tuple[str, str]]  # (title, row key)
    speed: tuple[str, str]  # (row key, axis label) of the bar plot
    quality: tuple[str, str]  # (row key, axis label) plotted against size
    card: list[tuple[str, str]]  # the model card's columns


DECODER = ReportLayout(
    columns=[
        ("artifact", "artifact"),
        ("quant", "quant"),
        ("method", "method"),
        ("size MB", "size_mb"),
        ("ppl", "perplexity"),
        ("ppl ratio", "ppl_ratio"),
        ("top-1", "top1"),
        ("KL", "kl"),
        ("gate", "gate"),
        ("decode tok/s", "decode_tok_s"),
        ("prefill tok/s", "prefill_tok_s"),
        ("TTFT s", "ttft_s"),
        ("p50 ms", "p50_ms"),
        ("p90 ms", "p90_ms"),
        ("peak RSS MB", "peak_rss_mb"),
        ("load s", "load_s"),
    ],
    speed=("decode_tok_s", "decode tokens/s (higher is better)"),
    quality=("perplexity", "perplexity on the parity text (lower is better)"),
    card=[
        ("artifact", "artifact"),
        ("format", "format"),
        ("quant", "quant"),
        ("MB", "size_mb"),
        ("ppl ratio", "ppl_ratio"),
        ("decode tok/s", "decode_tok_s"),
    ],
)
ENCODER = ReportLayout(
    columns=[
        ("artifact", "artifact"),
        ("quant", "quant"),
        ("method", "method"),
        ("size MB", "size_mb"),
        ("min cosine", "min_cosine"),
        ("mean cosine", "mean_cosine"),
        ("max |diff|", "max_abs_diff"),
        ("label agreement", "label_agreement"),
        ("gate", "gate"),
        ("p50 ms @128", "latency_p50_ms"),
        ("p90 ms @128", "latency_p90_ms"),
        ("batch-8 inputs/s", "throughput_per_s"),
        ("peak RSS MB", "peak_rss_mb"),
        ("load s", "load_s"),
    ],
    speed=("throughput_per_s", "inputs/s at batch 8, 128 tokens (higher is better)"),
    quality=("min_cosine", "min cosine similarity to the fp32 source (higher is better)"),
    card=[
        ("artifact", "artifact"),
        ("format", "format"),
        ("quant", "quant"),
        ("MB", "size_mb"),
        ("min cosine", "min_cosine"),
        ("p50 ms @128", "latency_p50_ms"),
    ],
)


def layout_for(manifest: Manifest) -> ReportLayout:
    return DECODER if manifest.source.get("task", "text-generation") == "text-generation" else ENCODER


def quantization_method(entry: Any) -> str:
    """How an artifact was quantized, in a few words: calibrated or not, and a fallback if one was chosen."""
    recipe = entry.recipe or {}
    if recipe.get("gate_recipe") in (None, "fp32", "fp16"):
        return "float"
    calibration = recipe.get("calibration")
    how = (
        f"calibrated ({calibration['calibration_tokens']:,} tokens)"
        if isinstance(calibration, dict)
        else "round-to-nearest"
    )
    tried = len(recipe.get("attempts") or [])
    return how + (f", after {tried - 1} recipe(s) missed" if tried > 1 else "")


def report_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """Flatten each artifact's parity and profile into one row of plain numbers."""
    decoder = layout_for(manifest) is DECODER
    rows = []
    for entry in manifest.artifacts:
        parity, prof = entry.parity or {}, entry.profile or {}
        row = {
            "artifact": entry.name,
            "format": entry.format,
            "quant": entry.quant,
            "method": quantization_method(entry),
            "runtime": entry.runtime,
            "size_mb": entry.bytes / 1e6,
            "gate": parity.get("gate"),
            "passed": parity.get("passed"),
            "peak_rss_mb": prof.get("peak_rss_mb"),
            "load_s": prof.get("load_s"),
        }
        if decoder:
            row |= {
                "perplexity": parity.get("perplexity"),
                "ppl_ratio": parity.get("ppl_ratio"),
                "top1": parity.get("top1_agreement"),
                "kl": parity.get("mean_kl"),
                "decode_tok_s": prof.get("decode_tok_s"),
                "prefill_tok_s": prof.get("prefill_tok_s"),
                "ttft_s": prof.get("ttft_s"),
                "p50_ms": prof.get("p50_token_ms"),
                "p90_ms": prof.get("p90_token_ms"),
            }
        else:
            row |= {key: parity.get(key) for key in ("min_cosine", "mean_cosine", "max_abs_diff", "label_agreement")}
            row |= {key: prof.get(key) for key in ("latency_p50_ms", "latency_p90_ms", "throughput_per_s")}
        rows.append(row)
    return rows + _device_rows(manifest, rows)


def _device_rows(manifest: Manifest, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows measured on other devices (`edgelm profile --device`): the same file's parity,
    that device's speed and memory, labelled `artifact @ device (machine)`."""
    by_name = {row["artifact"]: row for row in local}
    speed_keys = {
        "decode_tok_s": "decode_tok_s",
        "prefill_tok_s": "prefill_tok_s",
        "ttft_s": "ttft_s",
        "p50_ms": "p50_token_ms",
        "p90_ms": "p90_token_ms",
        "peak_rss_mb": "peak_rss_mb",
        "load_s": "load_s",
        "latency_p50_ms": "latency_p50_ms",
        "latency_p90_ms": "latency_p90_ms",
        "throughput_per_s": "throughput_per_s",
    }
    rows = []
    for run in manifest.device_profiles:
        device = run["device"]
        for name, prof in run["profiles"].items():
            if name not in by_name:
                continue
            row = dict(by_name[name])
            row |= {key: prof.get(source) for key, source in speed_keys.items() if key in row}
            row |= {"artifact": f"{name} @ {device.get('address')} ({device.get('machine')})", "device": device}
            rows.append(row)
    return rows


def card_rows(manifest: Manifest) -> tuple[list[str], list[list[str]]]:
    """The model card's table: column titles and formatted cells, one row per artifact."""
    card = layout_for(manifest).card
    return [title for title, _ in card], [[format_cell(row[key]) for _, key in card] for row in report_rows(manifest)]


def format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def _markdown(rows: list[dict[str, Any]], manifest: Manifest) -> str:
    columns = layout_for(manifest).columns
    header = "| " + " | ".join(title for title, _ in columns) + " |"
    lines = [
        f"# edgelm report: {manifest.source['model_id']} → {manifest.target}",
        "",
        f"Parity text: {manifest.parity_text.get('description', '')}",
        "",
        header,
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(format_cell(row[key]) for _, key in columns) + " |" for row in rows]
    device = next((a.profile["device"] for a in manifest.artifacts if a.profile), {})
    if device:
        lines += [
            "",
            f"Device: {device.get('cpu')} ({device.get('machine')}), {device.get('cores')} cores, "
            f"{device.get('memory_gb')} GB, {device.get('os')}",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in device.get("versions", {}).items()),
        ]
    scopes = {a.profile.get("rss_scope") for a in manifest.artifacts if a.profile} - {None, "process"}
    if scopes:
        lines += [
            "",
            "Peak RSS: " + "; ".join(sorted(scopes)) + ". `edgelm profile BUNDLE` measures a process that "
            "runs the artifact alone.",
        ]
    if manifest.source.get("random_shape"):
        lines += [
            "",
            f"Random weights at {manifest.source['random_shape']}'s shape (edgelm.shapes): judge parity by mean KL, "
            "top-1 agreement and max |logit diff| against the source; a random model's perplexity on English is "
            "near its vocabulary size and its ratio says little.",
        ]
    skipped = manifest.reference.get("skipped_formats")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    for name, why in manifest.reference.get("omitted", {}).items():
        tried = ", ".join(
            f"{a['quant']}{' calibrated' if a['calibrated'] else ''} ({a['result']})" for a in why["attempts"]
        )
        lines += ["", f"Left out: {name}: {why['reason']}; tried {tried}."]
    calibrated = next(
        (
            a.recipe["calibration"]
            for a in manifest.artifacts
            if a.recipe and isinstance(a.recipe.get("calibration"), dict)
        ),
        None,
    )
    if calibrated:
        text = calibrated["calibration_text"]
        lines += ["", f"Calibration: {calibrated['method']}, on {text['tokens']:,} tokens of {text['text']}."]
    return "\n".join(lines + _vendor_lines(manifest) + _step_lines(manifest)) + "\n"


def _step_lines(manifest: Manifest) -> list[str]:
    """Where the export's wall time and memory went, step by step (the report itself is written
    after). Peak RSS is the process's (or the background worker's) high-water mark in the step;
    file-backed is how much of the resident memory at the step's end was mapped files (the
    source's safetensors weights: resident, but pages the kernel can drop and read again)."""
    steps = manifest.export_steps
    if not steps:
        return []
    total = sum(s["seconds"] for s in steps if s.get("depth", 0) == 0 and not s.get("background"))
    peaks = [s["peak_rss_mb"] for s in steps if s.get("peak_rss_mb") is not None]
    slowest = max((s for s in steps if s.get("depth", 0) == 0), key=lambda s: s["seconds"])
    lines = [
        "",
        f"Export steps ({total:.0f} s of wall time before this report; slowest: {slowest['step']}, "
        f"{slowest['seconds']:.0f} s" + (f"; highest peak RSS {max(peaks):,.0f} MB" if peaks else "") + "):",
        "",
        "| step | seconds | share | peak RSS (MB) | file-backed at end (MB) |",
        "|---|---|---|---|---|",
    ]
    for s in steps:
        indent = "↳ " * s.get("depth", 0)
        share = "beside the others" if s.get("background") else f"{s['seconds'] / max(total, 1e-9):.0%}"
        peak, mapped = ("" if s.get(key) is None else f"{s[key]:,.0f}" for key in ("peak_rss_mb", "file_backed_mb"))
        lines.append(f"| {indent}{s['step']} | {s['seconds']:.1f} | {share} | {peak} | {mapped} |")
    per_artifact = []
    for name in [a.name for a in manifest.artifacts]:
        own = [s for s in steps if f" {name} " in f" {s['step']} " or f" {name}'s " in f" {s['step']} "]
        if own:
            worst = max(own, key=lambda s: s["seconds"])
            per_artifact.append(f"{name}: {worst['step']} ({worst['seconds']:.0f} s)")
    if per_artifact:
        lines += ["", "Slowest step per artifact: " + "; ".join(per_artifact) + "."]
    return lines


def _vendor_lines(manifest: Manifest) -> list[str]:
    """Which vendor LLM runtime ran each artifact, its verdict, and both decode speeds."""
    rows = [(a, v) for a in manifest.artifacts for v in a.vendor_runtimes]
    if not rows:
        return []
    lines = [
        "",
        "Vendor runtimes (greedy continuation of the parity prompt, compared with edgelm's on the same file):",
        "",
        "| artifact | runtime | version | result | vendor decode tok/s | edgelm decode tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for artifact, vendor in rows:
        ours = (artifact.profile or {}).get("decode_tok_s")
        result = vendor["result"]
        if vendor.get("tie_breaks"):  # edgelm.vendors.near_ties: the runtimes took different near-tied tokens
            steps = ", ".join(str(step) for step in vendor["tie_breaks"])
            result += f" (took a token within {TIE_MARGIN} logits of edgelm's at step {steps})"
        lines.append(
            f"| {artifact.name} | {vendor['runtime']} | {vendor.get('version') or '-'} | {result} | "
            f"{format_cell(vendor.get('vendor_decode_tok_s'))} | {format_cell(ours)} |"
        )
    return lines


def _html(rows: list[dict[str, Any]], manifest: Manifest, plots: list[str]) -> str:
    columns = layout_for(manifest).columns
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(row[key]))}</td>" for _, key in columns) + "</tr>"
        for row in rows
    )
    images = "".join(f'<p><img src="plots/{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in plots)
    title = html.escape(f"edgelm report: {manifest.source['model_id']} → {manifest.target}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        f"padding:4px 8px;text-align:right}}</style></head><body><h1>{title}</h1>"
        f"<table><tr>{head}</tr>{body}</table>{images}</body></html>\n"
    )


def _plots(rows: list[dict[str, Any]], layout: ReportLayout, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (speed, speed_label), (quality, quality_label) = layout.speed, layout.quality
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["artifact"] for r in rows], [r[speed] or 0 for r in rows])
    ax.set_xlabel(speed_label)
    fig.tight_layout()
    fig.savefig(folder / f"{speed}.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row[quality] is not None:
            ax.scatter(row["size_mb"], row[quality])
            ax.annotate(row["artifact"], (row["size_mb"], row[quality]))
    ax.set_xlabel("file size MB")
    ax.set_ylabel(quality_label)
    fig.tight_layout()
    fig.savefig(folder / f"size_vs_{quality}.png", dpi=100)
    plt.close("all")
    return [f"{speed}.png", f"size_vs_{quality}.png"]


def write_report(folder: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """Write report.json, report.md, report.html and plots/ into `folder`; return the rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = report_rows(manifest)
    plots = _plots(rows, layout_for(manifest), folder / "plots")
    (folder / "report.json").write_text(
        json.dumps(
            {
                "source": manifest.source,
                "target": manifest.target,
                "parity_text": manifest.parity_text,
                "rows": rows,
                "artifacts": [a.__dict__ for a in manifest.artifacts],
                "export_steps": manifest.export_steps,
            },
            indent=2,
        )
        + "\n"
    )
    (folder / "report.md").write_text(_markdown(rows, manifest))
    (folder / "report.html").write_text(_html(rows, manifest, plots))
    return rows
