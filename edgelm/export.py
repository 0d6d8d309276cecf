"""`export_bundle`: source model → artifacts → parity → profile → report → bundle.

Each stage is a named step so the CLI can draw progress; the library works without it.
The bundle is built in a temp folder and renamed into place only if everything worked
(including the parity gates, unless allow_drift).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgelm import __version__
from edgelm.artifacts import REFERENCE_FORMAT, ArtifactBuilder
from edgelm.bundle import ArtifactEntry, Manifest, atomic_bundle_dir, write_manifest
from edgelm.calibration import Calibration
from edgelm.encoder_eval import ENCODER_GATES
from edgelm.errors import EdgeLMError, ExportError, ParityError, UnsupportedError
from edgelm.evaluate import EVALUATIONS
from edgelm.exporter import EXPORTER_MODULES, check_quant, get_exporter, missing_requirements
from edgelm.memo_session import MemoizedSession
from edgelm.model import SourceModel, inspect_source, load_reference_model
from edgelm.parity import (
    CONFIDENT_TOP1_GATES,
    DEFAULT_GATES,
    GREEDY_PROMPT_TOKENS,
    KL_GATES,
    ParitySettings,
)
from edgelm.report import card_rows, write_report
from edgelm.steps import StepClock, StepHook, active_steps
from edgelm.targets import get_target
from edgelm.tokenizer import Tokenizer
from edgelm.up_to_date import current_bundle, export_key
from edgelm.vendors import generation_facts
from edgelm.vendors.check import VendorChecks

QUANT_RECIPES = ("fp32", "fp16", "int8", "int4")  # the README's recipes; each format maps them to its own types
CALIBRATION_STATISTICS = ".calibration-statistics"  # GPTQ statistics, in the work folder while the export runs


@dataclass
class ExportOptions:
    target: str = "android"
    formats: tuple[str, ...] | None = None  # None: the target preset's
    quants: tuple[str, ...] | None = None  # None: the preset's per format
    allow_drift: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    gates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GATES))  # decoders: max ppl ratio
    kl_gates: dict[str, float] = field(default_factory=lambda: dict(KL_GATES))  # decoders: max mean KL
    top1_gates: dict[str, float] = field(default_factory=lambda: dict(CONFIDENT_TOP1_GATES))  # min, confident positions
    encoder_gates: dict[str, float] = field(default_factory=lambda: dict(ENCODER_GATES))  # encoders: min cosine
    parity: ParitySettings = field(default_factory=ParitySettings)
    profile: bool = True
    profile_new_tokens: int = 128
    profile_repeats: int = 3
    threads: int | None = None
    gguf_types: tuple[str, ...] = ()  # extra llama.cpp file types by name (Q4_0, IQ4_NL, ...), beside --quant
    delegate: str | None = None  # ExecuTorch backend (xnnpack default); checked before the model loads
    compress: str | Path | None = None  # a compression recipe (JSON) run on the model before export
    calibrate: bool = True  # int8/int4 from activation-aware scaled weights (edgelm.calibration)
    vendor_check: bool = True  # run each decoder artifact in its format's own LLM runtime (edgelm.vendors)
    allow_vendor_mismatch: bool = False  # keep an artifact that runtime refuses or runs differently
    background: bool = True  # slow single-threaded exports (ExecuTorch, TFLite) in workers beside the others
    reuse: bool = True  # an intact bundle at the output made from the same inputs is kept (edgelm.up_to_date)


def plan_artifacts(
    options: ExportOptions, task: str = "text-generation", parameters: int = 0
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(format, quant) pairs to build for a model of `parameters` serving `task`, and what was
    skipped with why (a format, or a format-quant the preset leaves out for a large model).

    The fp32 reference always comes first. A requested quant or task a format cannot do is
    an error; a preset format this edgelm cannot export (yet, or for this task) is skipped
    and reported.
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
        exporter = get_exporter(fmt)  # UnsupportedError naming the known formats
        missing = missing_requirements(exporter)
        if missing:
            reason = f"the {fmt} exporter needs {', '.join(missing)}: pip install 'edgelm[export,{fmt}]'"
            if options.formats:
                raise UnsupportedError(reason)
            skipped[fmt] = reason
            continue
        if task not in exporter.tasks:
            reason = f"the {fmt} exporter does not handle {task} models (it does: {', '.join(exporter.tasks)})"
            if options.formats:
                raise UnsupportedError(reason)
            skipped[fmt] = reason
            continue
        preset_quants, left_out = preset.quants_for(fmt, parameters)
        if not options.quants:
            skipped.update({f"{fmt}-{quant}": preset.large_model_reason for quant in left_out})
        for quant in options.quants or preset_quants or exporter.quants[:1]:
            check_quant(exporter, quant)
            plan.append((fmt, quant))
        plan += [(fmt, quant) for quant in exporter.planned_quants(options)]
        exporter.check_options(options)
    _check_format_options(options, {fmt for fmt, _ in plan})
    return plan, skipped


def _check_format_options(options: ExportOptions, planned: set[str]) -> None:
    """A format's own option (--gguf-type, --delegate) given without that format in the plan is an error."""
    for fmt in EXPORTER_MODULES:
        if fmt in planned:
            continue
        for field_name, flag in get_exporter(fmt).own_options.items():
            if getattr(options, field_name):
                raise UnsupportedError(
                    f"{flag} only applies to {fmt}; add {fmt} to --formats (or use a target that has it)"
                )


def _note_progress(step: StepHook, what: str) -> Callable[[int, int], None]:
    """A progress callback that writes `what done/total` beside the running step (CLI), or nothing."""
    note = getattr(step, "note", None)
    return (lambda done, total: note(f"{what} {done}/{total}")) if note else (lambda done, total: None)


def _export_one(
    exporter: Any, model: Any, source: SourceModel, work: Path, quant: str, name: str, **settings: Any
) -> Any:
    """One artifact; a converter's own exception becomes an ExportError naming the artifact
    (the bundle is still being built in a temp dir, so nothing half-written is left)."""
    try:
        return exporter.export(model, source, work, quant, **settings)
    except EdgeLMError:
        raise
    except Exception as err:
        raise ExportError(
            f"{name}: the {exporter.format} converter failed on this {source.model_type} model "
            f"({type(err).__name__}: {str(err)[:500]}); other formats may still export it — "
            f"try --formats without {exporter.format}"
        ) from err


def _vendor_checks(
    model: Any, tokenizer: Tokenizer, evaluation: Any, source: SourceModel, work: Path, options: ExportOptions
) -> VendorChecks | None:
    """The vendor-runtime checks of a decoder export: the parity prompt (its first tokens, as
    text) and the model's facts; None for encoders (no vendor LLM runtime runs them)."""
    if not options.vendor_check or source.task != "text-generation":
        return None
    prompt = tokenizer.decode(evaluation.ids[:GREEDY_PROMPT_TOKENS])
    return VendorChecks(tokenizer, generation_facts(work / "tokenizer", model.config), prompt, options.threads)


def _calibration(model: Any, tokenizer: Tokenizer, work: Path, step: StepHook) -> Calibration:
    """The export's calibration: progress on the step display, GPTQ statistics in files in the work folder."""
    return Calibration(
        model, tokenizer, progress=_note_progress(step, "calibrating"), statistics=work / CALIBRATION_STATISTICS
    )


def _generation_defaults(model: Any) -> dict[str, Any]:
    """Sampling defaults from the model's generation_config (greedy when it doesn't sample);
    empty for an encoder, which generates nothing."""
    if not getattr(model, "can_generate", lambda: False)():
        return {}
    gen = getattr(model, "generation_config", None)
    if gen is None or not getattr(gen, "do_sample", False):
        return {
            "temperature": 0.0,
            "max_new_tokens": 256,
            "repetition_penalty": float(getattr(gen, "repetition_penalty", 1.0) or 1.0),
        }
    return {
        "temperature": float(gen.temperature or 1.0),
        "top_k": int(gen.top_k or 0),
        "top_p": float(gen.top_p or 1.0),
        "repetition_penalty": float(gen.repetition_penalty or 1.0),
        "max_new_tokens": 256,
    }


def _model_card(source: SourceModel, manifest: Manifest, bundle_name: str) -> str:
    titles, rows = card_rows(manifest)
    table = "\n".join(
        ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)] + ["| " + " | ".join(row) + " |" for row in rows]
    )
    usage = (
        'print(lm.generate("What is a KV cache?", max_new_tokens=64))'
        if source.task == "text-generation"
        else 'print(lm.embed(["What is a KV cache?"]))'
        if source.task == "feature-extraction"
        else 'print(lm.classify(["What is a KV cache?"]))'
    )
    compression = manifest.compression or {}
    base_model = compression.get("base_model", source.model_id)
    relation = compression.get("base_model_relation", "quantized")
    compressed = ""
    if compression:
        done = ", ".join(s["step"].replace("_", " ") for s in compression.get("steps", []))
        ppl = compression.get("perplexity", {})
        compressed = (
            f"\nCompressed from {base_model} by `edgelm compress` ({done}); held-out perplexity "
            + " → ".join(f"{k} {v:.2f}" for k, v in ppl.items())
            + " (compression.json in the manifest).\n"
        )
    return f"""---
base_model: {base_model}
base_model_relation: {relation}
library_name: edgelm
pipeline_tag: {source.task}
tags: [edgelm, on-device, {manifest.target}]
---
# {source.model_id} for {manifest.target}

Exported by edgelm {__version__} from `{Path(source.path).name}` (sha256 `{source.sha256[:16]}…`,
{source.num_parameters / 1e6:.1f} M parameters, {source.family}, {source.task}).
{compressed}
{table}

Parity is measured against the fp32 source on {manifest.parity_text.get("description", "the parity text")}.
Full figures: `report/report.md`.

## Run it

```python
import edgelm
lm = edgelm.load("{bundle_name}")
{usage}
```

or `edgelm run {bundle_name} --prompt "What is a KV cache?"`.
"""


def _compression_record(source: SourceModel) -> dict[str, Any] | None:
    """The compression.json of a folder `edgelm compress` wrote, trimmed of per-step loss curves."""
    from edgelm.compress.recipe import CompressionRecord

    if source.kind != "hf-folder":
        return None
    try:
        record = CompressionRecord.read(Path(source.path))
    except (ValueError, TypeError, EdgeLMError):
        return None  # a hand-edited or foreign file: the export does not depend on it
    if record is None:
        return None
    data = record.to_dict()
    data["steps"] = [{k: v for k, v in s.items() if k not in ("losses", "scores")} for s in data["steps"]]
    return data


def _export_compressed(model: str | Path | None, output: Path, options: ExportOptions, step: StepHook) -> Manifest:
    """`edgelm export --compress RECIPE`: compress into a scratch folder beside `output`, export that."""
    from edgelm.bundle import check_replaceable
    from edgelm.compress.recipe import CompressRecipe

    recipe = CompressRecipe.load(options.compress)  # a bad recipe fails before any work
    check_replaceable(output.absolute(), options.overwrite, (Path(model),) if model else ())  # before hours of work
    from edgelm.compress.pipeline import compress_model
    from edgelm.staging import scratch_beside

    with scratch_beside(output.absolute()) as scratch:  # cleaned by a later run if this one is killed
        compressed = scratch / output.name  # the folder name becomes the compressed model's id
        compress_model(model, compressed, recipe, allow_pickle=options.allow_pickle, step=step)
        return export_bundle(compressed, output, replace(options, compress=None), step)


def _app_chat_facts(model: Any, tokenizer: Tokenizer) -> dict[str, Any]:
    """What an app whose runtime takes raw text needs to chat (the Android sample reads it):
    stop tokens, the BOS the tokenizer adds itself, the template rendered into turn strings."""
    if not getattr(model, "can_generate", lambda: False)():
        return {}
    from edgelm.chat_turns import chat_turns
    from edgelm.vendors import tokenizer_facts

    facts = tokenizer_facts(tokenizer.folder, getattr(model.generation_config, "eos_token_id", None))
    return {
        "eos_token_ids": list(facts["eos_ids"]),
        "tokenizer_adds_bos_id": facts["bos_id"],
        "chat": chat_turns(tokenizer),
    }


def _new_manifest(
    source: SourceModel,
    options: ExportOptions,
    model_obj: Any,
    tokenizer: Tokenizer,
    evaluation: Any,
    skipped: dict[str, str],
    key: str,
) -> Manifest:
    """The manifest of a new bundle, before any artifact is in it."""
    return Manifest(
        edgelm_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        source=source.to_dict() | {"path": Path(source.path).name},
        target=options.target,
        tokenizer={"path": "tokenizer", "chat_template": tokenizer.chat_template is not None},
        generation=_generation_defaults(model_obj) | _app_chat_facts(model_obj, tokenizer),
        parity_text=evaluation.describe(),
        reference={"skipped_formats": skipped},
        compression=_compression_record(source),
        export_key=key,
    )


def _build_all(
    builder: ArtifactBuilder, plan: list[tuple[str, str]], manifest: Manifest, options: ExportOptions
) -> list[str]:
    """Build every planned artifact into `manifest`; the gate failures (an artifact whose every
    recipe missed its gate is left out and recorded, not failed)."""
    failures = []
    built: dict[tuple[str, str], ArtifactEntry] = {}
    try:
        order = builder.grouped_by_recipe(plan)
        order = builder.start_background_exports(order) if options.background else order
        rest = list(order)
        while rest:
            fmt, quant = builder.next_to_build(rest)
            rest.remove((fmt, quant))
            entry, failure = builder.build(fmt, quant)
            builder.release_unneeded(rest)
            if entry is not None:
                built[(fmt, quant)] = entry
            if failure:
                failures.append(failure)
            elif entry is None:
                manifest.reference.setdefault("omitted", {})[f"{fmt}-{quant}"] = builder.omitted[-1]
    finally:
        builder.finish_all()  # also stops a background export when another artifact failed
    manifest.artifacts += [built[item] for item in plan if item in built]  # the preset's order of preference
    return failures


def export_bundle(
    model: str | Path | None, output: str | Path, options: ExportOptions | None = None, step: StepHook | None = None
) -> Manifest:
    """Export `model` (None: the default SmolLM2) into a bundle folder at `output`.

    Returns the manifest written — or, when `output` already holds an intact bundle made from
    the same source, options, versions and machine, that bundle's manifest (edgelm.up_to_date;
    options.reuse=False exports anyway). Raises InvalidModelError / UnsupportedError /
    TokenizerError for bad input (before anything is written), ParityError when an
    artifact misses its gate without allow_drift (nothing is left at `output`).
    """
    options = options or ExportOptions()
    step = StepClock(step)  # the report's table of where the time went
    output = Path(output)
    if options.compress:
        return _export_compressed(model, output, options, step)
    with step("Inspecting the source model"):
        source = inspect_source(model, allow_pickle=options.allow_pickle)
        plan, skipped = plan_artifacts(options, source.task, source.num_parameters)
        key = export_key(source, options)
    if options.reuse:
        with step(f"Checking the bundle already at {output}"):
            existing = current_bundle(output, key)
        if existing is not None:
            return existing  # same source, options, versions and machine: nothing would change
    with atomic_bundle_dir(output, overwrite=options.overwrite, protect=(Path(source.path),)) as work:
        with step("Loading the fp32 reference model"):
            model_obj = load_reference_model(source, work / "tokenizer")
            tokenizer = Tokenizer(work / "tokenizer")
            evaluation = EVALUATIONS[source.task](tokenizer, options, source.task)
        from edgelm.runtimes.torch_reference import reference_session

        reference = reference_session(model_obj, source.task)
        if source.task == "text-generation":  # every artifact is scored on the same windows: compute them once
            reference = MemoizedSession(reference, work)
        manifest = _new_manifest(source, options, model_obj, tokenizer, evaluation, skipped, key)
        builder = ArtifactBuilder(
            model_obj,
            source,
            work,
            options,
            evaluation,
            reference,
            step,
            _calibration(model_obj, tokenizer, work, step),
            _vendor_checks(model_obj, tokenizer, evaluation, source, work, options),
        )
        with active_steps(step):  # exporters' phases become nested steps
            failures = _build_all(builder, plan, manifest, options)
        reference.close()
        if failures and not options.allow_drift:
            raise ParityError("parity gate failed (nothing written; --allow-drift keeps it): " + "; ".join(failures))
        manifest.export_steps = step.to_list()
        with step("Writing report and model card"):
            write_report(work / "report", manifest)
            (work / "README.md").write_text(_model_card(source, manifest, str(output)))
            write_manifest(work, manifest)
    return manifest
