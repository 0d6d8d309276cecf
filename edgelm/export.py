"""`export_bundle`: source model → artifacts → parity → profile → report → bundle.

Each stage is a named step so the CLI can draw progress; the library works without it.
The bundle is built in a temp folder and renamed into place only if everything worked
(including the parity gates, unless allow_drift).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm import __version__
from edgelm.bundle import ArtifactEntry, Manifest, atomic_bundle_dir, write_manifest
from edgelm.errors import ParityError, UnsupportedError
from edgelm.exporter import EXPORTER_MODULES, PLANNED_FORMATS, check_quant, get_exporter
from edgelm.model import SourceModel, inspect_source, load_reference_model, sha256_file
from edgelm.parity import DEFAULT_GATES, ParitySettings, measure_parity, parity_text
from edgelm.profile import profile_session, timed
from edgelm.report import write_report
from edgelm.session import get_runtime
from edgelm.targets import get_target
from edgelm.tokenizer import Tokenizer

StepHook = Callable[[str], AbstractContextManager[Any]]
REFERENCE_FORMAT = "safetensors"
QUANT_RECIPES = ("fp32", "fp16", "int8", "int4")  # DESIGN.md's table; formats map them
EXPORT_RSS_SCOPE = "measured in the export process, which also holds the fp32 torch reference"


@dataclass
class ExportOptions:
    target: str = "android"
    formats: tuple[str, ...] | None = None  # None: the target preset's
    quants: tuple[str, ...] | None = None  # None: the preset's per format
    allow_drift: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    gates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GATES))
    parity: ParitySettings = field(default_factory=ParitySettings)
    profile: bool = True
    profile_new_tokens: int = 128
    profile_repeats: int = 3
    threads: int | None = None


def plan_artifacts(options: ExportOptions) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(format, quant) pairs to build, and formats skipped with the reason why.

    The fp32 reference always comes first. A requested quant a format cannot do is an
    error; a preset format this edgelm cannot export yet is skipped and reported.
    """
    preset = get_target(options.target)
    formats = options.formats or preset.formats
    unknown = [q for q in options.quants or () if q not in QUANT_RECIPES]
    if unknown:
        raise UnsupportedError(f"unknown --quant {', '.join(unknown)}; recipes: {', '.join(QUANT_RECIPES)}")
    plan: list[tuple[str, str]] = [(REFERENCE_FORMAT, "fp32")]
    skipped: dict[str, str] = {}
    for fmt in formats:
        if fmt == REFERENCE_FORMAT:
            for quant in options.quants or ():
                check_quant(get_exporter(fmt), quant)
            continue
        if fmt not in EXPORTER_MODULES:  # checked first: a planned format has no module to import
            if fmt in PLANNED_FORMATS:
                skipped[fmt] = "not implemented in this edgelm version yet"
                continue
            get_exporter(fmt)  # raises UnsupportedError naming the known formats
        exporter = get_exporter(fmt)
        for quant in options.quants or preset.quants.get(fmt, exporter.quants[:1]):
            check_quant(exporter, quant)
            plan.append((fmt, quant))
    return plan, skipped


def _generation_defaults(model: Any) -> dict[str, Any]:
    """Sampling defaults from the model's generation_config (greedy when it doesn't sample)."""
    gen = getattr(model, "generation_config", None)
    if gen is None or not getattr(gen, "do_sample", False):
        return {"temperature": 0.0, "max_new_tokens": 256, "repetition_penalty": float(getattr(gen, "repetition_penalty", 1.0) or 1.0)}
    return {
        "temperature": float(gen.temperature or 1.0), "top_k": int(gen.top_k or 0), "top_p": float(gen.top_p or 1.0),
        "repetition_penalty": float(gen.repetition_penalty or 1.0), "max_new_tokens": 256,
    }


def _model_card(source: SourceModel, manifest: Manifest, bundle_name: str) -> str:
    rows = "\n".join(
        f"| {a.name} | {a.format} | {a.quant} | {a.bytes / 1e6:.1f} | "
        f"{(a.parity or {}).get('ppl_ratio', float('nan')):.4f} | {(a.profile or {}).get('decode_tok_s', float('nan')):.1f} |"
        for a in manifest.artifacts
    )
    return f"""---
base_model: {source.model_id}
base_model_relation: quantized
library_name: edgelm
tags: [edgelm, on-device, {manifest.target}]
---
# {source.model_id} for {manifest.target}

Exported by edgelm {__version__} from `{Path(source.path).name}` (sha256 `{source.sha256[:16]}…`,
{source.num_parameters / 1e6:.1f} M parameters, {source.family}).

| artifact | format | quant | MB | ppl ratio | decode tok/s |
|---|---|---|---|---|---|
{rows}

Perplexity ratios are against the fp32 source on {manifest.parity_text.get('description', 'the parity text')}.
Full figures: `report/report.md`.

## Run it

```python
import edgelm
lm = edgelm.load("{bundle_name}")
print(lm.generate("What is a KV cache?", max_new_tokens=64))
```

or `edgelm run {bundle_name} --prompt "What is a KV cache?"`.
"""


def export_bundle(model: str | Path | None, output: str | Path, options: ExportOptions | None = None,
                  step: StepHook | None = None) -> Manifest:
    """Export `model` (None: the default SmolLM2) into a bundle folder at `output`.

    Returns the manifest written. Raises InvalidModelError / UnsupportedError /
    TokenizerError for bad input (before anything is written), ParityError when an
    artifact misses its gate without allow_drift (nothing is left at `output`).
    """
    options = options or ExportOptions()
    step = step or (lambda _name: nullcontext())
    output = Path(output)
    with step("Inspecting the source model"):
        source = inspect_source(model, allow_pickle=options.allow_pickle)
        if source.task != "text-generation":
            raise UnsupportedError(
                f"{source.path}: {source.family} is an encoder ({source.task}); encoder bundles arrive with the ONNX "
                "exporter — this edgelm exports decoders (text generation) only"
            )
        plan, skipped = plan_artifacts(options)
    with atomic_bundle_dir(output, overwrite=options.overwrite) as work:
        with step("Loading the fp32 reference model"):
            model_obj = load_reference_model(source, work / "tokenizer")
            tokenizer = Tokenizer(work / "tokenizer")
            text = parity_text()
            ids = tokenizer.encode(text)[: options.parity.max_tokens]
        from edgelm.runtimes.torch_reference import TorchSession

        reference = TorchSession(model_obj)
        manifest = Manifest(
            edgelm_version=__version__,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            source=source.to_dict() | {"path": Path(source.path).name},
            target=options.target,
            tokenizer={"path": "tokenizer", "chat_template": tokenizer.chat_template is not None},
            generation=_generation_defaults(model_obj),
            parity_text={
                "description": f"pydoc_data.topics (first 40,000 chars), first {len(ids)} tokens, "
                               f"windows of {options.parity.window} every {options.parity.stride}",
                "tokens": len(ids), "window": options.parity.window, "stride": options.parity.stride,
                "sha256_of_text": __import__("hashlib").sha256(text.encode()).hexdigest(),
            },
            reference={"skipped_formats": skipped},
        )
        failures = []
        for fmt, quant in plan:
            exporter = get_exporter(fmt)
            name = f"{fmt}-{quant}" if fmt != REFERENCE_FORMAT else "reference-fp32"
            with step(f"Exporting {name}"):
                artifact = exporter.export(model_obj, source, work, quant)
            runtime = get_runtime(exporter.runtime)
            with step(f"Loading {name} in {runtime.name}"):
                session, load_s = timed(runtime.open, artifact.path, threads=options.threads)
            with step(f"Measuring parity of {name} on real text"):
                gate = options.gates.get(quant, options.gates["fp32"])
                parity = measure_parity(session, reference, ids, gate, options.parity)
            file_bytes = artifact.path.stat().st_size + sum(f.stat().st_size for f in artifact.extra_files)
            profile = None
            if options.profile:
                with step(f"Profiling {name} ({options.profile_new_tokens} new tokens × {options.profile_repeats})"):
                    profile = profile_session(session, tokenizer, max_new_tokens=options.profile_new_tokens,
                                              repeats=options.profile_repeats, load_s=load_s,
                                              file_bytes=file_bytes, threads=options.threads,
                                              rss_scope=EXPORT_RSS_SCOPE).to_dict()
            session.close()
            manifest.artifacts.append(ArtifactEntry(
                name=name, format=fmt, path=artifact.path.relative_to(work).as_posix(),
                sha256=sha256_file(artifact.path), bytes=file_bytes, quant=artifact.quant,
                runtime=runtime.name, runtime_version=runtime.version(), built_by=artifact.built_by,
                signature=artifact.signature, parity=parity.to_dict(), profile=profile,
            ))
            if not parity.passed:
                failures.append(f"{name}: ppl ratio {parity.ppl_ratio:.4f} > gate {gate}")
        for fmt in dict.fromkeys(f for f, _ in plan):
            finish = getattr(get_exporter(fmt), "finish", None)
            if finish:
                finish(work)  # drop scratch files an exporter kept between its quant recipes
        if failures and not options.allow_drift:
            raise ParityError("parity gate failed (nothing written; --allow-drift keeps it): " + "; ".join(failures))
        with step("Writing report and model card"):
            write_report(work / "report", manifest)
            (work / "README.md").write_text(_model_card(source, manifest, str(output)))
            write_manifest(work, manifest)
    return manifest
