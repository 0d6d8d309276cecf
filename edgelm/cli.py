"""The `edgelm` command line: thin typer commands over the library API.

Exit codes: 0 ok, 1 a parity gate failed, 2 bad input (any other EdgeLMError). Errors
print as one line; `--debug` (or EDGELM_DEBUG=1) shows the full traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from edgelm.errors import EdgeLMError, UnsupportedError

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


def _split(values: Optional[str]) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in values.split(",") if v.strip()) if values else None


@contextmanager
def _progress() -> Iterator[Any]:
    """A rich progress display whose `step(name)` context shows a spinner, then a tick and the time."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True)) as progress:

        @contextmanager
        def step(name: str) -> Iterator[None]:
            task = progress.add_task(name, total=1)
            try:
                yield
            except BaseException:
                progress.remove_task(task)  # the error line says what failed; no false tick
                raise
            progress.update(task, completed=1)

        yield step


def _report_table(manifest: Any, title: str) -> Table:
    from edgelm.report import format_cell, layout_for, report_rows

    hidden = ("prefill_tok_s", "p50_ms", "load_s", "gate", "mean_cosine")
    shown = [c for c in layout_for(manifest).columns if c[1] not in hidden]
    table = Table(title=title)
    for heading, _ in shown:
        table.add_column(heading, justify="right", no_wrap=True)
    for row in report_rows(manifest):
        table.add_row(*(format_cell(row[key]) for _, key in shown))
    return table


@app.command()
def export(
    model: Annotated[Optional[str], typer.Argument(help="HF folder or .gguf file; omitted: the bundled SmolLM2-135M-Instruct.")] = None,
    target: Annotated[str, typer.Option("--target", "-t", help="Target preset (see `edgelm targets`).")] = "android",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Bundle folder to write (default dist/<model>-<target>).")] = None,
    formats: Annotated[Optional[str], typer.Option(help="Comma-separated formats (default: the target's).")] = None,
    quant: Annotated[Optional[str], typer.Option(help="Comma-separated quant recipes: fp32,fp16,int8,int4.")] = None,
    gguf_type: Annotated[Optional[str], typer.Option(
        help="Extra GGUF files of these llama.cpp types (e.g. Q4_0,Q5_K_M,IQ4_NL), gated like the recipe they "
             "are closest to.")] = None,
    delegate: Annotated[Optional[str], typer.Option(
        help="ExecuTorch backend: xnnpack (default); vulkan, qnn, coreml, mps where this install can lower to "
             "them and run the result.")] = None,
    allow_drift: Annotated[bool, typer.Option(help="Keep artifacts that miss their parity gate.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Accept PyTorch pickle checkpoints (they can run code).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --output.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="Threads for runtimes while measuring.")] = None,
    repeats: Annotated[int, typer.Option(help="Measured profile runs per artifact (after a warm-up).")] = 3,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per profile run.")] = 128,
    no_profile: Annotated[bool, typer.Option("--no-profile", help="Skip profiling (parity still runs).")] = False,
) -> None:
    """Turn a checkpoint into a deployment bundle: export, check parity on real text, profile, report."""
    from edgelm.export import ExportOptions, export_bundle

    name = Path(model).stem if model else "smollm2"
    output = output or Path("dist") / f"{name}-{target}"
    options = ExportOptions(target=target, formats=_split(formats), quants=_split(quant), allow_drift=allow_drift,
                            gguf_types=_split(gguf_type) or (), delegate=delegate,
                            overwrite=overwrite, allow_pickle=allow_pickle, threads=threads,
                            profile=not no_profile, profile_repeats=repeats, profile_new_tokens=new_tokens)
    with _progress() as step:
        manifest = export_bundle(model, output, options, step=step)
    console.print(_report_table(manifest, f"{manifest.source['model_id']} → {target}"))
    console.print("peak RSS here is the export process's (it also holds the torch reference); "
                  f"`edgelm profile {output}` measures each artifact alone")
    for fmt, why in manifest.reference.get("skipped_formats", {}).items():
        console.print(f"[yellow]skipped {fmt}[/]: {why}")
    console.print(f"Bundle written to [bold]{output}[/] (report: {output}/report/report.html)")
    console.print(f"Try it: edgelm run {output} --prompt \"What is a KV cache?\"")
    if target == "android":
        console.print(f"On a phone: edgelm push {output} --device adb:SERIAL (serials: `adb devices`), or plain "
                      f"`adb push {output} /data/local/tmp/edgelm/{output.name}` for the sample app")


@app.command()
def run(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `edgelm export`.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue (chat template applied when the model has one).")],
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="Artifact name or format (default: the first).")] = None,
    device: Annotated[str, typer.Option(help="cpu, gpu or npu.")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Maximum tokens to generate.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most likely tokens (0 = off).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass (1 = off).")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help=">1 discourages repeats.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Do not apply the chat template.")] = False,
) -> None:
    """Generate text from a bundle, streaming it to stdout (an encoder bundle prints the
    prompt's embedding or its label probabilities instead)."""
    import edgelm
    from edgelm.api import TextEncoder

    sampling = {k: v for k, v in dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                      repetition_penalty=repetition_penalty, seed=seed).items() if v is not None}
    if stop:
        sampling["stop"] = tuple(stop)
    lm = edgelm.load(bundle, format=format, device=device, threads=threads)
    if isinstance(lm, TextEncoder):
        _print_encoder_output(lm, prompt)
        return
    for piece in lm.stream(prompt, chat=False if no_chat else None, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _print_encoder_output(encoder: Any, text: str) -> None:
    if encoder.task == "text-classification":
        for label, prob in encoder.classify(text)[0].items():
            console.print(f"{label}\t{prob:.4f}")
        return
    vector = encoder.embed(text)[0]
    shown = ", ".join(f"{v:.4f}" for v in vector[:8])
    console.print(f"embedding: {vector.shape[0]} dims, L2 norm {float((vector ** 2).sum() ** 0.5):.4f}: [{shown}, …]")


@app.command()
def profile(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="Artifact name or format (default: all).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads.")] = None,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per run.")] = 128,
    repeats: Annotated[int, typer.Option(help="Measured runs after a warm-up.")] = 3,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the profiles as JSON here.")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="Profile on this device instead (see `edgelm devices`; push the bundle first with `edgelm push`) and "
             "add its rows to the bundle's report.")] = None,
    to: Annotated[Optional[str], typer.Option(help="Where the bundle was pushed on the device (as `edgelm push --to`).")
                  ] = None,
) -> None:
    """Profile artifacts of a bundle on this machine or a device (same prompts and token counts for each)."""
    import edgelm
    from edgelm.bundle import read_bundle

    if device:
        _profile_on_device(bundle, device, to, format, new_tokens, repeats, threads)
        return
    manifest = read_bundle(bundle)
    names = [manifest.artifact(format).name] if format else [a.name for a in manifest.artifacts]
    decoder = manifest.source.get("task", "text-generation") == "text-generation"
    columns = (("size MB", "load s", "TTFT s", "prefill tok/s", "decode tok/s", "p50 ms", "p90 ms", "peak RSS MB")
               if decoder else ("size MB", "load s", "p50 ms @128", "p90 ms @128", "batch-8 inputs/s", "peak RSS MB"))
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
        cells = ((prof.ttft_s, 3), (prof.prefill_tok_s, 1), (prof.decode_tok_s, 1), (prof.p50_token_ms, 1),
                 (prof.p90_token_ms, 1)) if decoder else \
            ((prof.latency_p50_ms, 2), (prof.latency_p90_ms, 2), (prof.throughput_per_s, 1))
        table.add_row(name, f"{prof.file_bytes / 1e6:.1f}", f"{prof.load_s:.2f}",
                      *(f"{value:.{digits}f}" for value, digits in cells), f"{prof.peak_rss_mb:.0f}")
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
        table.add_row(address, "reachable", str(record["machine"]), str(record["cores"]), str(record["memory_gb"]),
                      str(record["os"]), str(record["cpu"]))
    console.print(table)


@app.command()
def push(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    device: Annotated[str, typer.Option(help="local, ssh://user@host[:port], adb:SERIAL or chroot:PATH.")],
    formats: Annotated[Optional[str], typer.Option(
        help="Comma-separated artifact names or formats to copy (default: every artifact but the torch reference).")
    ] = None,
    to: Annotated[Optional[str], typer.Option(
        help="Folder on the device (default /data/local/tmp/edgelm/<bundle> on Android, /tmp/edgelm/<bundle> "
             "elsewhere).")] = None,
) -> None:
    """Copy a bundle's artifacts to a device: staged, sha256-checked there, then renamed into place."""
    from edgelm.devices import open_device
    from edgelm.push import push_bundle

    transport = open_device(device)
    with console.status(f"pushing {bundle} to {device}…") as status:
        result = push_bundle(bundle, transport, to, _split(formats),
                             on_file=lambda rel, size: status.update(f"pushed {rel} ({size / 1e6:.1f} MB)"))
    console.print(f"{len(result.files) + 1} files ({result.bytes / 1e6:.1f} MB, sha256 checked on the device) in "
                  f"[bold]{device}:{result.destination}[/]: {', '.join(result.artifacts)}")


def _profile_on_device(bundle: Path, device: str, to: Optional[str], format: Optional[str], new_tokens: int,
                       repeats: int, threads: Optional[int]) -> None:
    from edgelm.device_profile import profile_on_device
    from edgelm.devices import open_device

    transport = open_device(device)
    with console.status(f"profiling on {device}…"):
        entry = profile_on_device(bundle, transport, to, (format,) if format else (), new_tokens, repeats, threads)
    record = entry["device"]
    table = Table(title=f"profile on {device}: {record.get('machine')}, {record.get('cores')} cores, "
                        f"{record.get('memory_gb')} GB, {record.get('os')}")
    for col in ("artifact", "decode tok/s", "prefill tok/s", "TTFT s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for name, prof in entry["profiles"].items():
        table.add_row(name, *(f"{prof.get(k) or 0:.2f}" for k in ("decode_tok_s", "prefill_tok_s", "ttft_s",
                                                                    "peak_rss_mb")))
    console.print(table)
    console.print(f"added to {bundle}/report/ beside the local rows")


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="A bundle folder, model folder, .gguf or .safetensors file.")]) -> None:
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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map errors to one line and an exit code."""
    try:
        result = app(args=argv, standalone_mode=False, prog_name="edgelm")
    except EdgeLMError as err:
        if _state["debug"]:
            traceback.print_exc()
        print(f"edgelm: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except click.exceptions.ClickException as err:
        err.show()
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("edgelm: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # a bug, not bad input: say so and keep the traceback one flag away
        if _state["debug"]:
            traceback.print_exc()
        print(f"edgelm: internal error: {type(err).__name__}: {_one_line(err)} (rerun with --debug and report it)",
              file=sys.stderr)
        sys.exit(3)
    sys.exit(result if isinstance(result, int) else 0)


__all__ = ["app", "main", "UnsupportedError"]
