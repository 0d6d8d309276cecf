"""The `edgelm` command line: thin typer commands over the library API.

Exit codes: 0 ok, 1 a parity gate failed, 2 bad input (any other EdgeLMError). Errors
print as one line; `--debug` (or EDGELM_DEBUG=1) shows the full traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from edgelm.errors import EdgeLMError, UnsupportedError
from edgelm.native_log import quiet_native_exit

app = typer.Typer(
    name="edgelm",
    help="Export a language model to ONNX / TFLite / ExecuTorch / GGUF, check each artifact against the "
    "source on real text, and run and profile it on-device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, tests) gets a wide console so tables are not squeezed to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)
_state = {"debug": bool(os.environ.get("EDGELM_DEBUG"))}


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = _state["debug"] or debug


def _split(values: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in values.split(",") if v.strip()) if values else None


@contextmanager
def _progress() -> Iterator[Any]:
    """A rich progress display whose `step(name)` context shows a spinner, then a tick and the time.

    `step.note(text)` appends live detail (a step count, a loss) to the running step's line.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as progress:
        running: list[tuple[Any, str]] = []

        @contextmanager
        def step(name: str) -> Iterator[None]:
            name = "  ↳ " * len(running) + name  # a phase inside a step (edgelm.steps.phase), indented
            task = progress.add_task(name, total=1)
            running.append((task, name))
            try:
                yield
            except BaseException:
                progress.remove_task(task)  # the error line says what failed; no false tick
                raise
            finally:
                running.pop()
            progress.update(task, completed=1, description=name)

        def note(text: str) -> None:
            if running:
                task, name = running[-1]
                progress.update(task, description=f"{name} · {text}")

        step.note = note  # type: ignore[attr-defined]
        yield step


def _report_table(manifest: Any, title: str) -> Table:
    from edgelm.report import format_cell, layout_for, report_rows

    hidden = ("prefill_tok_s", "p50_ms", "load_s", "gate", "mean_cosine", "method")
    shown = [c for c in layout_for(manifest).columns if c[1] not in hidden]
    table = Table(title=title)
    for heading, _ in shown:
        table.add_column(heading, justify="right", no_wrap=True)
    for row in report_rows(manifest):
        table.add_row(*(format_cell(row[key]) for _, key in shown))
    return table


@app.command()
def export(
    model: Annotated[
        str | None, typer.Argument(help="HF folder or .gguf file; omitted: the bundled SmolLM2-135M-Instruct.")
    ] = None,
    target: Annotated[str, typer.Option("--target", "-t", help="Target preset (see `edgelm targets`).")] = "android",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Bundle folder to write (default dist/<model>-<target>).")
    ] = None,
    formats: Annotated[str | None, typer.Option(help="Comma-separated formats (default: the target's).")] = None,
    quant: Annotated[str | None, typer.Option(help="Comma-separated quant recipes: fp32,fp16,int8,int4.")] = None,
    gguf_type: Annotated[
        str | None,
        typer.Option(
            help="Extra GGUF files of these llama.cpp types (e.g. Q4_0,Q5_K_M,IQ4_NL), gated like the recipe they "
            "are closest to."
        ),
    ] = None,
    delegate: Annotated[
        str | None,
        typer.Option(
            help="ExecuTorch backend: xnnpack (default); vulkan, qnn, coreml, mps where this install can lower to "
            "them and run the result."
        ),
    ] = None,
    allow_drift: Annotated[bool, typer.Option(help="Keep artifacts that miss their parity gate.")] = False,
    calibrate: Annotated[
        bool,
        typer.Option(
            help="Quantize int8/int4 from activation-aware scaled weights, searched on calibration text (never the "
            "parity text). A quantized artifact that misses its gate is retried uncalibrated, then with the "
            "format's more faithful types, and left out (with the reason in the report) if none holds."
        ),
    ] = True,
    vendor_check: Annotated[
        bool,
        typer.Option(
            help="Run each decoder artifact in its format's own LLM runtime (ExecuTorch's TextLLMRunner, "
            "onnxruntime-genai, llama.cpp's Llama) and require edgelm's greedy text from it; the manifest "
            "records each runtime's version and verdict. A runtime that is not installed is recorded as "
            "skipped."
        ),
    ] = True,
    allow_vendor_mismatch: Annotated[
        bool,
        typer.Option(
            help="Keep an artifact its vendor runtime refuses or runs to other text (the verdict stays in the "
            "manifest)."
        ),
    ] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Accept PyTorch pickle checkpoints (they can run code).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --output.")] = False,
    background: Annotated[
        bool,
        typer.Option(
            help="Export ExecuTorch and TFLite (minutes of single-threaded lowering each) in worker processes while "
            "the other formats export, for models over 50M parameters when memory allows a copy per worker; "
            "workers are paused while anything is profiled. --no-background exports everything in this "
            "process, one after another."
        ),
    ] = True,
    rebuild: Annotated[
        bool,
        typer.Option(
            help="Export even if --output already holds an intact bundle made from the same model, options, "
            "edgelm and runtime versions on this machine (by default that bundle is kept: re-running an "
            "unchanged export takes seconds)."
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Threads for the export's own work and for every measurement. Default: every core for "
            "what is timed, and the cores the background exports leave for the rest."
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Measured profile runs per artifact (after a warm-up).")] = 3,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per profile run.")] = 128,
    no_profile: Annotated[bool, typer.Option("--no-profile", help="Skip profiling (parity still runs).")] = False,
    compress: Annotated[
        Path | None,
        typer.Option(
            help="Compress first with this JSON recipe (see `edgelm compress`); artifacts are checked against the "
            "compressed model, and the manifest records the recipe and its perplexity before/after."
        ),
    ] = None,
) -> None:
    """Turn a checkpoint into a deployment bundle: export, check parity on real text, profile, report."""
    from edgelm.export import ExportOptions, export_bundle

    name = Path(model).stem if model else "smollm2"
    output = output or Path("dist") / f"{name}-{target}"
    options = ExportOptions(
        target=target,
        formats=_split(formats),
        quants=_split(quant),
        allow_drift=allow_drift,
        gguf_types=_split(gguf_type) or (),
        delegate=delegate,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        threads=threads,
        profile=not no_profile,
        profile_repeats=repeats,
        profile_new_tokens=new_tokens,
        compress=compress,
        calibrate=calibrate,
        vendor_check=vendor_check,
        allow_vendor_mismatch=allow_vendor_mismatch,
        background=background,
        reuse=not rebuild,
    )
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with _progress() as step:
        manifest = export_bundle(model, output, options, step=step)
    if manifest.created < started:
        console.print(
            f"[green]{output} is up to date[/]: made on {manifest.created} from the same model, options and "
            "versions on this machine (--rebuild exports it again)"
        )
    console.print(_report_table(manifest, f"{manifest.source['model_id']} → {target}"))
    console.print(
        "peak RSS here is the export process's (it also holds the torch reference); "
        f"`edgelm profile {output}` measures each artifact alone"
    )
    for fmt, why in manifest.reference.get("skipped_formats", {}).items():
        console.print(f"[yellow]skipped {fmt}[/]: {why}")
    for name, why in manifest.reference.get("omitted", {}).items():
        console.print(
            f"[yellow]left out {name}[/]: {why['reason']} (tried {len(why['attempts'])} recipes; "
            "report/report.md lists them)"
        )
    for artifact in manifest.artifacts:
        for vendor in artifact.vendor_runtimes:
            if vendor["result"] != "passed":
                console.print(f"[yellow]{artifact.name} in {vendor['runtime']}[/]: {vendor['result']}")
    console.print(f"Bundle written to [bold]{output}[/] (report: {output}/report/report.html)")
    console.print(f'Try it: edgelm run {output} --prompt "What is a KV cache?"')
    if target == "android":
        console.print(
            f"On a phone: edgelm push {output} --device adb:SERIAL (serials: `adb devices`), or plain "
            f"`adb push {output} /data/local/tmp/edgelm/{output.name}` for the sample app"
        )


@app.command()
def compress(
    model: Annotated[
        str | None, typer.Argument(help="HF folder or .gguf file; omitted: the bundled SmolLM2-135M-Instruct.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Model folder to write (default dist/<model>-compressed).")
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(help="A JSON recipe (or a compression.json to repeat); the options below add to it."),
    ] = None,
    drop_layers: Annotated[int, typer.Option(help="Drop this many layers, chosen by --importance.")] = 0,
    importance: Annotated[
        str, typer.Option(help="How layers are chosen: loss (greedy, measured), cosine (ShortGPT), last.")
    ] = "loss",
    prune: Annotated[
        str | None,
        typer.Option(
            help="l1 (global), l1-layer, 2:4 (these zero weights; files keep their size), heads or channels "
            "(structured: matrices shrink)."
        ),
    ] = None,
    sparsity: Annotated[float, typer.Option(help="Fraction of weights / heads / channels --prune removes.")] = 0.5,
    distill_steps: Annotated[int, typer.Option(help="Knowledge-distillation steps from the base model (0: none).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Distillation sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Distillation sequence length.")] = 128,
    lr: Annotated[float, typer.Option(help="Distillation peak learning rate.")] = 2e-4,
    temperature: Annotated[float, typer.Option(help="Distillation softmax temperature.")] = 2.0,
    hidden_weight: Annotated[
        float, typer.Option(help="Weight of the hidden-state MSE term (layer-reduced students).")
    ] = 0.0,
    teacher_continuations: Annotated[
        int,
        typer.Option(
            help="Add this many teacher-generated continuations of training prompts to the training text "
            "(sequence-level distillation)."
        ),
    ] = 0,
    max_mb: Annotated[float | None, typer.Option(help="Budget search: largest artifact size in MB.")] = None,
    max_ppl_ratio: Annotated[
        float | None, typer.Option(help="Budget search: largest perplexity ratio to the base fp32 model.")
    ] = None,
    target: Annotated[
        str, typer.Option(help="Budget search: target preset whose formats and quants are tried.")
    ] = "android",
    formats: Annotated[str | None, typer.Option(help="Budget search: only these formats.")] = None,
    quant: Annotated[str | None, typer.Option(help="Budget search: only these quant recipes.")] = None,
    layer_grid: Annotated[str, typer.Option(help="Budget search: layer counts to try dropping.")] = "0,2,4,6",
    channel_grid: Annotated[str, typer.Option(help="Budget search: MLP channel fractions to try pruning.")] = "0",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder at --output.")] = False,
) -> None:
    """Make a model smaller before export: drop layers, prune, distill; or search a size / perplexity budget.

    The output is an ordinary model folder (config, safetensors, tokenizer, compression.json)
    that `edgelm export` takes. With --max-mb / --max-ppl-ratio, recipes are exported and
    measured per format, and the smallest that meets both limits is written.
    """
    from edgelm.compress.distill import DistillSettings
    from edgelm.compress.pipeline import compress_model
    from edgelm.compress.recipe import CompressRecipe

    name = Path(model).stem if model else "smollm2"
    output = output or Path("dist") / f"{name}-compressed"
    if max_mb is not None or max_ppl_ratio is not None:
        _budget_search(
            model,
            output,
            max_mb,
            max_ppl_ratio,
            target,
            formats,
            quant,
            layer_grid,
            channel_grid,
            importance,
            distill_steps,
            overwrite,
        )
        return
    base = CompressRecipe.load(recipe).to_dict() if recipe else {}
    if drop_layers:
        base["drop_layers"] = {"count": drop_layers, "importance": importance}
    if prune:
        base["prune"] = {"method": prune, "sparsity": sparsity}
    if teacher_continuations:
        base["teacher_continuations"] = teacher_continuations
    if distill_steps:
        base["distill"] = DistillSettings(
            steps=distill_steps,
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            temperature=temperature,
            hidden_weight=hidden_weight,
        ).__dict__
    plan = CompressRecipe.from_dict(base)
    with _progress() as step:

        def on_distill_step(done: int, loss: float, tokens_per_s: float) -> None:
            step.note(f"step {done}/{plan.distill.steps} · loss {loss:.4f} · {tokens_per_s:.0f} tok/s")

        record = compress_model(model, output, plan, overwrite=overwrite, step=step, on_distill_step=on_distill_step)
    table = Table(title=f"{record.base_model} → {output}")
    for col in ("stage", "held-out ppl", "ratio to base"):
        table.add_column(col, justify="right")
    base_ppl = record.perplexity.get("base")
    for stage, value in record.perplexity.items():
        table.add_row(stage, f"{value:.3f}", f"{value / base_ppl:.3f}" if base_ppl else "")
    console.print(table)
    console.print(
        f"parameters: {record.parameters['before'] / 1e6:.1f} M → {record.parameters['after'] / 1e6:.1f} M; "
        f"held-out text: {record.corpus.get('heldout_tokens')} tokens, training text: "
        f"{record.corpus.get('train_tokens')} tokens"
    )
    if any(s.get("shrinks_files") is False for s in record.steps):
        console.print(
            "[yellow]note[/]: unstructured and 2:4 sparsity zero weights but keep every matrix's shape; "
            "no exported format stores them sparsely, so files do not get smaller (use heads/channels)"
        )
    console.print(f"Next: edgelm export {output} --target android")


def _budget_table(result: Any, max_mb: float, max_ppl_ratio: float) -> Table:
    table = Table(title=f"budget: ≤ {max_mb} MB, ppl ratio ≤ {max_ppl_ratio}")
    for col in (
        "layers dropped",
        "MLP channels pruned",
        "artifact",
        "MB",
        "ppl ratio",
        "decode tok/s",
        "Pareto",
        "fits",
    ):
        table.add_column(col, justify="right")
    for c in sorted(result.candidates, key=lambda c: c.megabytes):
        chosen = "[bold green]chosen" if c is result.chosen else ("yes" if c.meets_budget else "")
        table.add_row(
            str(c.layers_dropped),
            f"{c.channel_fraction:.0%}",
            c.artifact,
            f"{c.megabytes:.1f}",
            f"{c.ppl_ratio:.3f}",
            f"{c.decode_tok_s:.1f}" if c.decode_tok_s else "-",
            "yes" if c.pareto else "",
            chosen,
        )
    return table


def _next_command(artifact: str, output: Path, model: str | None, target: str) -> str:
    """The `edgelm export` that turns the budget search's choice into a bundle."""
    fmt, _, recipe_quant = artifact.partition("-")
    source = output if (output / "config.json").is_file() else model  # None: the default model, no argument
    command = [
        "edgelm",
        "export",
        *([str(source)] if source else []),
        "--target",
        target,
        "--formats",
        fmt,
        "--quant",
        recipe_quant,
    ]
    return " ".join(command)


def _budget_search(
    model: str | None,
    output: Path,
    max_mb: float | None,
    max_ppl_ratio: float | None,
    target: str,
    formats: str | None,
    quant: str | None,
    layer_grid: str,
    channel_grid: str,
    importance: str,
    distill_steps: int,
    overwrite: bool,
) -> None:
    from edgelm.compress.budget import SearchSpace, search_budget
    from edgelm.export import ExportOptions

    if max_mb is None or max_ppl_ratio is None:
        raise EdgeLMError("a budget search needs both --max-mb and --max-ppl-ratio")
    try:
        space = SearchSpace(
            layers_dropped=tuple(int(v) for v in _split(layer_grid) or ()),
            channel_fractions=tuple(float(v) for v in _split(channel_grid) or ()),
            importance=importance,
            distill_steps=distill_steps,
        )
    except ValueError as err:
        raise EdgeLMError(f"--layer-grid takes integers and --channel-grid fractions: {err}") from err
    options = ExportOptions(
        target=target, formats=_split(formats), quants=_split(quant), profile_repeats=1, profile_new_tokens=32
    )
    with _progress() as step:
        result = search_budget(
            model,
            output,
            max_mb=max_mb,
            max_ppl_ratio=max_ppl_ratio,
            export_options=options,
            space=space,
            overwrite=overwrite,
            step=step,
        )
    console.print(_budget_table(result, max_mb, max_ppl_ratio))
    if result.chosen is None:
        raise EdgeLMError(
            f"no candidate meets {max_mb} MB and ppl ratio {max_ppl_ratio} (the table shows the closest; "
            f"{output}/budget.json has them all): loosen a limit or widen --layer-grid/--channel-grid"
        )
    chosen = result.chosen
    console.print(
        f"Chosen: {chosen.artifact} with {chosen.layers_dropped} layers dropped and "
        f"{chosen.channel_fraction:.0%} MLP channels pruned ({chosen.megabytes:.1f} MB, ppl ratio "
        f"{chosen.ppl_ratio:.3f}); written to {output}"
    )
    console.print("Next: " + _next_command(chosen.artifact, output, model, target))


@app.command()
def run(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `edgelm export`.")],
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="Text to continue (chat template applied when the model has one).")
    ],
    format: Annotated[
        str | None, typer.Option("--format", "-f", help="Artifact name or format (default: the first).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, gpu or npu.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="Runtime threads.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Maximum tokens to generate.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep the k most likely tokens (0 = off).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (1 = off).")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help=">1 discourages repeats.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Do not apply the chat template.")] = False,
    runtime: Annotated[
        str,
        typer.Option(
            help="edgelm (its runtime and sampling loop) or vendor: the format's own LLM runtime and loop on the same "
            "file (ExecuTorch's TextLLMRunner, onnxruntime-genai, llama.cpp's Llama), greedy, as an app runs it."
        ),
    ] = "edgelm",
) -> None:
    """Generate text from a bundle, streaming it to stdout (an encoder bundle prints the
    prompt's embedding or its label probabilities instead)."""
    import edgelm
    from edgelm.api import TextEncoder

    sampling = {
        k: v
        for k, v in dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        ).items()
        if v is not None
    }
    if stop:
        sampling["stop"] = tuple(stop)
    _check_runtime_choice(runtime)
    if runtime == "vendor":
        _run_in_vendor_runtime(bundle, format, prompt, threads, max_new_tokens, no_chat, sampling)
        return
    lm = edgelm.load(bundle, format=format, device=device, threads=threads)
    if isinstance(lm, TextEncoder):
        _print_encoder_output(lm, prompt)
        return
    for piece in lm.stream(prompt, chat=False if no_chat else None, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `edgelm export`.")],
    format: Annotated[
        str | None, typer.Option("--format", "-f", help="Artifact name or format to serve (default: the first).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 127.0.0.1 keeps it to this machine (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key_file: Annotated[
        Path | None,
        typer.Option(help="A file holding the API key; every route but /health then needs Authorization: Bearer KEY."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Runtime threads.")] = None,
    max_body_kb: Annotated[int, typer.Option(help="Largest request body accepted (413 above it).")] = 1024,
    prefix_cache: Annotated[
        bool, typer.Option(help="Continue from the KV cache where a prompt starts like the previous one.")
    ] = True,
    parallel: Annotated[
        int,
        typer.Option(
            help="Requests generated at once, batched into one step, where the runtime can (llama.cpp: GGUF "
            "artifacts); each has its own KV cache. Other runtimes generate one request at a time."
        ),
    ] = 4,
) -> None:
    """Serve a bundle over the OpenAI API, for the openai client and anything that speaks it.

    Routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health, /metrics.
    Requests beyond those generating wait in arrival order (GGUF: --parallel at once, batched).
    A chat that resends its history continues from the KV cache of the shared prefix.
    Structured output: response_format json_schema or json_object, or regex / grammar (extra_body).
    """
    try:
        import uvicorn

        from edgelm.serve.app import create_app
        from edgelm.serve.engine import ServedModel
        from edgelm.serve.metrics import ServerMetrics
    except ImportError as err:
        raise UnsupportedError(
            f"edgelm serve needs its extra: pip install 'edgelm[serve]' ({err.name} is missing)"
        ) from None
    key = _read_api_key(api_key_file) if api_key_file else None
    if not 0 < port < 65536:
        raise UnsupportedError(f"--port must be between 1 and 65535, not {port}")
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UnsupportedError(f"--parallel must be between 1 and {MAX_PARALLEL}, not {parallel}")
    served = ServedModel(bundle, format, threads, ServerMetrics(), prefix_cache=prefix_cache, parallel=parallel)
    where = f"http://{host}:{port}/v1"
    at_once = f", {served.batched} requests at once" if served.batched > 1 else ""
    console.print(
        f"serving {served.id} ({served.model.artifact.name}{at_once}) at {where}"
        + (" (API key required)" if key else "")
    )
    uvicorn.run(create_app(served, api_key=key, max_body=max_body_kb * 1024), host=host, port=port, log_level="warning")


MAX_PARALLEL = 64  # each sequence holds a KV cache of the artifact's full context


def _read_api_key(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UnsupportedError(f"--api-key-file {path}: cannot read it ({err})") from None
    if not key or any(c.isspace() for c in key):
        raise UnsupportedError(f"--api-key-file {path}: expected one key on one line")
    return key


RUNTIME_CHOICES = ("edgelm", "vendor")


def _check_runtime_choice(runtime: str) -> None:
    if runtime not in RUNTIME_CHOICES:
        raise UnsupportedError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIME_CHOICES)}")


def _run_in_vendor_runtime(
    bundle: Path,
    format: str | None,
    prompt: str,
    threads: int | None,
    max_new_tokens: int | None,
    no_chat: bool,
    sampling: dict[str, Any],
) -> None:
    """`edgelm run --runtime vendor`: the artifact's own LLM runtime streams its greedy text."""
    from edgelm.bundle import read_bundle
    from edgelm.tokenizer import Tokenizer
    from edgelm.vendors import vendor_for

    unsupported = sorted(set(sampling) - {"max_new_tokens", "temperature"})
    if unsupported or sampling.get("temperature", 0.0) != 0.0:
        raise UnsupportedError(
            "--runtime vendor runs the vendor's greedy loop; sampling options "
            f"({', '.join(unsupported or ['temperature'])}) apply to --runtime edgelm"
        )
    manifest = read_bundle(bundle)
    entry = (
        manifest.artifact(format)
        if format
        else next((a for a in manifest.artifacts if a.vendor_runtimes), manifest.artifacts[0])
    )
    vendor, facts = vendor_for(bundle, entry)
    tokenizer = Tokenizer(bundle / manifest.tokenizer["path"])
    text = (
        prompt
        if no_chat or tokenizer.chat_template is None
        else tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    )
    new_tokens = max_new_tokens or int(manifest.generation.get("max_new_tokens", 256))

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    vendor.generate(bundle / entry.path, bundle, text, facts, new_tokens, threads, on_text=show)
    sys.stdout.write("\n")


def _vendor_profile_table(
    bundle: Path, entries: list[Any], runners: dict[str, Any], rates: dict[str, Any], both: bool
) -> tuple[Table, dict[str, Any]]:
    """The medians of each artifact's rounds, as a table and as the --json record."""
    import statistics

    table = Table(title=f"profile in the vendors' runtimes: {bundle}")
    columns = (
        "artifact",
        "vendor runtime",
        "tokens",
        "vendor decode tok/s",
        *(("edgelm decode tok/s",) if both else ()),
    )
    for col in columns:
        table.add_column(col, justify="right")
    results = {}
    for entry in entries:
        row = rates[entry.name]
        results[entry.name] = {
            "runtime": runners[entry.name][0].name,
            **row,
            "vendor_decode_tok_s": statistics.median(row["vendor"]),
            **({"edgelm_decode_tok_s": statistics.median(row["edgelm"])} if both else {}),
        }
        table.add_row(
            entry.name,
            runners[entry.name][0].name,
            str(max(row["tokens"])),
            f"{results[entry.name]['vendor_decode_tok_s']:.1f}",
            *((f"{results[entry.name]['edgelm_decode_tok_s']:.1f}",) if both else ()),
        )
    return table, results


def _profile_vendor_runtimes(
    bundle: Path,
    format: str | None,
    threads: int | None,
    new_tokens: int,
    repeats: int,
    json_out: Path | None,
    both: bool,
) -> None:
    """Decode tok/s of each artifact in its vendor's LLM runtime (and edgelm's, with `both`),
    interleaved round by round on the same prompt; medians."""

    import edgelm
    from edgelm.bundle import read_bundle
    from edgelm.profile import DEFAULT_PROMPTS
    from edgelm.vendors import vendor_for

    manifest = read_bundle(bundle)
    entries = [manifest.artifact(format)] if format else [a for a in manifest.artifacts if a.vendor_runtimes]
    if not entries:
        raise UnsupportedError(f"{bundle}: no artifact was checked in a vendor runtime at export (re-export it)")
    runners = {entry.name: vendor_for(bundle, entry) for entry in entries}  # refuses before any work
    rates: dict[str, dict[str, list[float]]] = {e.name: {"vendor": [], "edgelm": [], "tokens": []} for e in entries}
    sessions = (
        {e.name: edgelm.load(bundle, format=e.name, threads=threads, verify=False) for e in entries} if both else {}
    )
    with console.status("profiling in the vendor runtimes…"):
        for entry in entries:  # warm-up
            vendor, facts = runners[entry.name]
            vendor.generate(bundle / entry.path, bundle, DEFAULT_PROMPTS[0], facts, 8, threads)
        for _ in range(repeats):
            for entry in entries:
                vendor, facts = runners[entry.name]
                run = vendor.generate(
                    bundle / entry.path, bundle, DEFAULT_PROMPTS[0], facts, new_tokens, threads, ignore_eos=True
                )
                rates[entry.name]["vendor"].append(run.decode_tok_s or 0.0)
                rates[entry.name]["tokens"].append(run.tokens)
                if both:
                    profile = sessions[entry.name].profile(max_new_tokens=new_tokens, repeats=1)
                    rates[entry.name]["edgelm"].append(profile.decode_tok_s)
    for session in sessions.values():
        session.close()
    table, results = _vendor_profile_table(bundle, entries, runners, rates, both)
    console.print(table)
    console.print(
        "vendor decode = tokens after the first ÷ time after the first, in the runtime's own loop, end-of-text "
        "ignored where its API allows (ExecuTorch's runner may stop early: tokens shows how many)"
    )
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


def _print_encoder_output(encoder: Any, text: str) -> None:
    if encoder.task == "text-classification":
        for label, prob in encoder.classify(text)[0].items():
            console.print(f"{label}\t{prob:.4f}")
        return
    vector = encoder.embed(text)[0]
    shown = ", ".join(f"{v:.4f}" for v in vector[:8])
    console.print(f"embedding: {vector.shape[0]} dims, L2 norm {float((vector**2).sum() ** 0.5):.4f}: [{shown}, …]")


@app.command()
def profile(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    format: Annotated[
        str | None, typer.Option("--format", "-f", help="Artifact name or format (default: all).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Runtime threads.")] = None,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per run.")] = 128,
    repeats: Annotated[int, typer.Option(help="Measured runs after a warm-up.")] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the profiles as JSON here.")] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Profile on this device instead (see `edgelm devices`; push the bundle first with `edgelm push`) and "
            "add its rows to the bundle's report."
        ),
    ] = None,
    to: Annotated[
        str | None, typer.Option(help="Where the bundle was pushed on the device (as `edgelm push --to`).")
    ] = None,
    runtime: Annotated[
        str,
        typer.Option(
            help="edgelm, vendor (each artifact's own LLM runtime and loop: decode tok/s as an app sees it), or both "
            "(side by side, interleaved)."
        ),
    ] = "edgelm",
) -> None:
    """Profile artifacts of a bundle on this machine or a device (same prompts and token counts for each)."""
    import edgelm
    from edgelm.bundle import read_bundle

    if runtime not in (*RUNTIME_CHOICES, "both"):
        raise UnsupportedError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIME_CHOICES)}, both")
    if runtime != "edgelm":
        _profile_vendor_runtimes(bundle, format, threads, new_tokens, repeats, json_out, both=runtime == "both")
        return
    if device:
        _profile_on_device(bundle, device, to, format, new_tokens, repeats, threads)
        return
    manifest = read_bundle(bundle)
    names = [manifest.artifact(format).name] if format else [a.name for a in manifest.artifacts]
    decoder = manifest.source.get("task", "text-generation") == "text-generation"
    columns = (
        ("size MB", "load s", "TTFT s", "prefill tok/s", "decode tok/s", "p50 ms", "p90 ms", "peak RSS MB")
        if decoder
        else ("size MB", "load s", "p50 ms @128", "p90 ms @128", "batch-8 inputs/s", "peak RSS MB")
    )
    table = Table(title=f"profile: {bundle}")
    for col in ("artifact", *columns):
        table.add_column(col, justify="right")
    results = {}
    for name in names:
        lm = edgelm.load(bundle, format=name, threads=threads, verify=False)
        with console.status(f"profiling {name}…"):
            prof = lm.profile(max_new_tokens=new_tokens, repeats=repeats) if decoder else lm.profile()
        lm.close()
        results[name] = prof.to_dict()
        cells = (
            (
                (prof.ttft_s, 3),
                (prof.prefill_tok_s, 1),
                (prof.decode_tok_s, 1),
                (prof.p50_token_ms, 1),
                (prof.p90_token_ms, 1),
            )
            if decoder
            else ((prof.latency_p50_ms, 2), (prof.latency_p90_ms, 2), (prof.throughput_per_s, 1))
        )
        table.add_row(
            name,
            f"{prof.file_bytes / 1e6:.1f}",
            f"{prof.load_s:.2f}",
            *(f"{value:.{digits}f}" for value, digits in cells),
            f"{prof.peak_rss_mb:.0f}",
        )
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


@app.command()
def devices() -> None:
    """List the devices edgelm can reach: this machine, every `adb devices` phone, and the
    addresses in EDGELM_DEVICES (comma-separated: ssh://user@host[:port], adb:SERIAL, chroot:PATH)."""
    from edgelm.devices import describe, known_devices, open_device

    table = Table(title="devices")
    for col in ("device", "status", "machine", "cores", "memory GB", "os", "cpu"):
        table.add_column(col)
    for address in known_devices():
        try:
            record = describe(open_device(address), timeout=30)
        except EdgeLMError as err:
            table.add_row(address, f"unreachable: {_one_line(err)[:120]}", "–", "–", "–", "–", "–")
            continue
        table.add_row(
            address,
            "reachable",
            str(record["machine"]),
            str(record["cores"]),
            str(record["memory_gb"]),
            str(record["os"]),
            str(record["cpu"]),
        )
    console.print(table)


@app.command()
def push(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    device: Annotated[str, typer.Option(help="local, ssh://user@host[:port], adb:SERIAL or chroot:PATH.")],
    formats: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated artifact names or formats to copy (default: every artifact but the torch reference)."
        ),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            help="Folder on the device (default /data/local/tmp/edgelm/<bundle> on Android, /tmp/edgelm/<bundle> "
            "elsewhere)."
        ),
    ] = None,
) -> None:
    """Copy a bundle's artifacts to a device: staged, sha256-checked there, then renamed into place."""
    from edgelm.devices import open_device
    from edgelm.push import push_bundle

    transport = open_device(device)
    with console.status(f"pushing {bundle} to {device}…") as status:
        result = push_bundle(
            bundle,
            transport,
            to,
            _split(formats),
            on_file=lambda rel, size: status.update(f"pushed {rel} ({size / 1e6:.1f} MB)"),
        )
    console.print(
        f"{len(result.files) + 1} files ({result.bytes / 1e6:.1f} MB, sha256 checked on the device) in "
        f"[bold]{device}:{result.destination}[/]: {', '.join(result.artifacts)}"
    )


def _profile_on_device(
    bundle: Path,
    device: str,
    to: str | None,
    format: str | None,
    new_tokens: int,
    repeats: int,
    threads: int | None,
) -> None:
    from edgelm.device_profile import profile_on_device
    from edgelm.devices import open_device

    transport = open_device(device)
    with console.status(f"profiling on {device}…"):
        entry = profile_on_device(bundle, transport, to, (format,) if format else (), new_tokens, repeats, threads)
    record = entry["device"]
    table = Table(
        title=f"profile on {device}: {record.get('machine')}, {record.get('cores')} cores, "
        f"{record.get('memory_gb')} GB, {record.get('os')}"
    )
    for col in ("artifact", "decode tok/s", "prefill tok/s", "TTFT s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for name, prof in entry["profiles"].items():
        table.add_row(
            name, *(f"{prof.get(k) or 0:.2f}" for k in ("decode_tok_s", "prefill_tok_s", "ttft_s", "peak_rss_mb"))
        )
    console.print(table)
    console.print(f"added to {bundle}/report/ beside the local rows")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A bundle folder, model folder, .gguf or .safetensors file.")],
) -> None:
    """Describe a bundle or model file without running it."""
    from edgelm.inspect import describe

    title, rows = describe(path)
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def doctor() -> None:
    """Show installed runtimes and exporters, their versions and devices, and the targets."""
    from edgelm.doctor import environment_report

    for title, rows in environment_report():
        table = Table(title=title)
        for col in rows[0]:
            table.add_column(col)
        for row in rows[1:]:
            table.add_row(*(str(c) for c in row))
        console.print(table)


@app.command()
def targets() -> None:
    """List target presets: formats, quant recipes, delegates, ABI."""
    from edgelm.targets import TARGETS

    table = Table(title="targets")
    for col in ("target", "formats (preferred first)", "quant", "delegates", "ABI", "description"):
        table.add_column(col)
    for t in TARGETS.values():
        quants = "; ".join(f"{f}: {','.join(q)}" for f, q in t.quants.items())
        table.add_row(t.name, ", ".join(t.formats), quants, ", ".join(t.delegates), t.abi, t.description)
    console.print(table)


# typer >= 0.20 vendors its own click (typer._click); usage errors come from whichever parsed the line
_CLICKS = tuple(dict.fromkeys([click, getattr(typer, "_click", click)]))
CLICK_ERRORS = tuple(c.exceptions.ClickException for c in _CLICKS)
CLICK_ABORTS = tuple(
    dict.fromkeys([click.exceptions.Abort, getattr(typer.exceptions, "Abort", click.exceptions.Abort)])
)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map errors to one line and an exit code."""
    quiet_native_exit()
    try:
        result = app(args=argv, standalone_mode=False, prog_name="edgelm")
    except EdgeLMError as err:
        if _state["debug"]:
            traceback.print_exc()
        print(f"edgelm: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except CLICK_ERRORS as err:  # a usage error: click's own message and usage line
        err.show()
        sys.exit(2)
    except OSError as err:  # the filesystem or a device refused (read-only, full, permissions): not a bug
        if _state["debug"]:
            traceback.print_exc()
        where = f"{err.filename}: " if err.filename else ""
        print(f"edgelm: error: {where}{err.strerror or _one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except CLICK_ABORTS + (KeyboardInterrupt,):
        print("edgelm: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # a bug, not bad input: say so and keep the traceback one flag away
        if _state["debug"]:
            traceback.print_exc()
        print(
            f"edgelm: internal error: {type(err).__name__}: {_one_line(err)} (rerun with --debug and report it)",
            file=sys.stderr,
        )
        sys.exit(3)
    sys.exit(result if isinstance(result, int) else 0)


__all__ = ["app", "main", "UnsupportedError"]
