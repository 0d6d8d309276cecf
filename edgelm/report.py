"""Reports: one row per artifact (parity + profile) as JSON, Markdown, HTML and PNG plots."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from edgelm.bundle import Manifest

COLUMNS = [
    ("artifact", "artifact"), ("quant", "quant"), ("size MB", "size_mb"), ("ppl", "perplexity"),
    ("ppl ratio", "ppl_ratio"), ("top-1", "top1"), ("KL", "kl"), ("gate", "gate"),
    ("decode tok/s", "decode_tok_s"), ("prefill tok/s", "prefill_tok_s"), ("TTFT s", "ttft_s"),
    ("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("peak RSS MB", "peak_rss_mb"), ("load s", "load_s"),
]


def report_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """Flatten each artifact's parity and profile into one row of plain numbers."""
    rows = []
    for entry in manifest.artifacts:
        parity, prof = entry.parity or {}, entry.profile or {}
        rows.append({
            "artifact": entry.name, "format": entry.format, "quant": entry.quant, "runtime": entry.runtime,
            "size_mb": entry.bytes / 1e6,
            "perplexity": parity.get("perplexity"), "ppl_ratio": parity.get("ppl_ratio"),
            "top1": parity.get("top1_agreement"), "kl": parity.get("mean_kl"), "gate": parity.get("gate"),
            "passed": parity.get("passed"),
            "decode_tok_s": prof.get("decode_tok_s"), "prefill_tok_s": prof.get("prefill_tok_s"),
            "ttft_s": prof.get("ttft_s"), "p50_ms": prof.get("p50_token_ms"), "p90_ms": prof.get("p90_token_ms"),
            "peak_rss_mb": prof.get("peak_rss_mb"), "load_s": prof.get("load_s"),
        })
    return rows


def format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def _markdown(rows: list[dict[str, Any]], manifest: Manifest) -> str:
    header = "| " + " | ".join(title for title, _ in COLUMNS) + " |"
    lines = [
        f"# edgelm report: {manifest.source['model_id']} → {manifest.target}", "",
        f"Parity text: {manifest.parity_text.get('description', '')}", "",
        header, "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(format_cell(row[key]) for _, key in COLUMNS) + " |" for row in rows]
    device = next((a.profile["device"] for a in manifest.artifacts if a.profile), {})
    if device:
        lines += ["", f"Device: {device.get('cpu')} ({device.get('machine')}), {device.get('cores')} cores, "
                      f"{device.get('memory_gb')} GB, {device.get('os')}",
                  "Versions: " + ", ".join(f"{k} {v}" for k, v in device.get("versions", {}).items())]
    scopes = {a.profile.get("rss_scope") for a in manifest.artifacts if a.profile} - {None, "process"}
    if scopes:
        lines += ["", "Peak RSS: " + "; ".join(sorted(scopes)) + ". `edgelm profile BUNDLE` measures a process that "
                  "runs the artifact alone."]
    skipped = manifest.reference.get("skipped_formats")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    return "\n".join(lines) + "\n"


def _html(rows: list[dict[str, Any]], manifest: Manifest, plots: list[str]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(row[key]))}</td>" for _, key in COLUMNS) + "</tr>" for row in rows
    )
    images = "".join(f'<p><img src="plots/{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in plots)
    title = html.escape(f"edgelm report: {manifest.source['model_id']} → {manifest.target}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            f"padding:4px 8px;text-align:right}}</style></head><body><h1>{title}</h1>"
            f"<table><tr>{head}</tr>{body}</table>{images}</body></html>\n")


def _plots(rows: list[dict[str, Any]], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = [r["artifact"] for r in rows]
    written = []
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(names, [r["decode_tok_s"] or 0 for r in rows])
    ax.set_xlabel("decode tokens/s (higher is better)")
    fig.tight_layout()
    fig.savefig(folder / "decode_tok_s.png", dpi=100)
    written.append("decode_tok_s.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row["perplexity"] is not None:
            ax.scatter(row["size_mb"], row["perplexity"])
            ax.annotate(row["artifact"], (row["size_mb"], row["perplexity"]))
    ax.set_xlabel("file size MB")
    ax.set_ylabel("perplexity on the parity text (lower is better)")
    fig.tight_layout()
    fig.savefig(folder / "size_vs_perplexity.png", dpi=100)
    written.append("size_vs_perplexity.png")
    plt.close("all")
    return written


def write_report(folder: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """Write report.json, report.md, report.html and plots/ into `folder`; return the rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = report_rows(manifest)
    plots = _plots(rows, folder / "plots")
    (folder / "report.json").write_text(json.dumps({
        "source": manifest.source, "target": manifest.target, "parity_text": manifest.parity_text,
        "rows": rows, "artifacts": [a.__dict__ for a in manifest.artifacts],
    }, indent=2) + "\n")
    (folder / "report.md").write_text(_markdown(rows, manifest))
    (folder / "report.html").write_text(_html(rows, manifest, plots))
    return rows
