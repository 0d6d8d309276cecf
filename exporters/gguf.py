"""GGUF exporter: the source state dict → an F32 GGUF (gguf package) → llama.cpp's quantizer.

Quant mapping (the README's recipes): fp32 → F32, fp16 → F16, int8 → Q8_0, int4 → Q4_K_M or
Q4_1, whichever stays closer to the source on the calibration text (INT4_TYPES: a model whose
weights came from a Q4_1 file, like the default one, is exactly representable in Q4_1 and loses
7% perplexity in Q4_K_M; a float model usually does better in Q4_K_M). Every recipe starts from one F32 file
written from the fp32 source model, so the k-quants are llama.cpp's own
(`llama_model_quantize`, via llama-cpp-python), not a re-implementation.
Architecture specifics live in gguf_arch.py (one row each), tokenizer metadata in
gguf_vocab.py (checked against llama.cpp's own tokenization before anything is written).
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

from edgelm.errors import UnsupportedError
from edgelm.exporter import ExportedArtifact, Exporter
from edgelm.model import SourceModel, linears_but_the_head
from edgelm.steps import phase

from .gguf_arch import gguf_architecture
from .gguf_vocab import choose_pre_tokenizer, read_vocab

# --quant -> llama.cpp file type (llama_cpp.LLAMA_FTYPE_<name>)
QUANT_TYPES = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "int8": "MOSTLY_Q8_0", "int4": "MOSTLY_Q4_K_M"}
SCRATCH = ".f32-source.gguf"
# int4: llama.cpp's 4-bit types of about the same size (4.5–5 bits per weight), tried in this order;
# the one whose logits stay closest to the source's on the calibration windows is kept
INT4_TYPES = ("MOSTLY_Q4_K_M", "MOSTLY_Q4_1")
ON_GRID_TYPE = "MOSTLY_Q4_1"  # a model whose layers all sit on its grid gets it unmeasured (layers_on_the_q4_1_grid)


# llama.cpp type name prefix -> the --quant recipe whose parity gate it is held to
GATE_BY_TYPE_PREFIX = {"F32": "fp32", "F16": "fp16", "BF16": "fp16", "Q8": "int8", "Q6": "int8", "Q5": "int8"}


def file_type(quant: str) -> str:
    """llama.cpp file type for a --quant recipe or a llama.cpp type name (Q4_0, IQ4_NL, ...)."""
    return QUANT_TYPES.get(quant) or f"MOSTLY_{quant}"


def file_name(quant: str) -> str:
    return type_file_name(file_type(quant))


def type_file_name(llama_type: str) -> str:
    return f"model-{llama_type.removeprefix('MOSTLY_').removeprefix('ALL_')}.gguf"


def layers_on_the_q4_1_grid(model: Any) -> bool:
    """Whether every Linear of the transformer layers (not the output head) sits on Q4_1's grid:
    each block of 32 inputs is min + step × (0..15), as in a model dequantized from a Q4_1 file
    (the default one). Q4_1 then reproduces every layer, and both INT4_TYPES store the embedding
    and the output head alike (llama.cpp's output-tensor rule: Q6_K, or Q8_0 for rows that are
    not a multiple of 256), so no type can be closer: measuring Q4_K_M against Q4_1 on the
    calibration text (two quantizations and three models over the windows, 34 s of the
    default model's export on an idle machine) would only confirm it."""
    from edgelm.scaling import PROXIES

    layers = [module.weight for _, module in linears_but_the_head(model)]
    return bool(layers) and all(w.shape[1] % 32 == 0 and PROXIES["int4"].reproduces(w) for w in layers)


def quantize_best(
    model: Any, scratch: Path, folder: Path, types: tuple[str, ...], windows: list[Any]
) -> tuple[Path, str, dict[str, float]]:
    """Each of `types` made from the F32 `scratch`, run by llama.cpp on the calibration `windows`
    ([1, n] token ids) and scored by its mean KL divergence from `model` (the torch model the
    F32 file was written from); the closest kept in `folder` under its own name, the others
    removed. Returns (path, type, scores). KL from the source, not perplexity: a perturbed
    model can score a lower perplexity on a text by chance; only the exact one has KL 0."""
    import numpy as np
    import torch

    from edgelm.isolation import mark_trusted
    from edgelm.parity import _log_softmax
    from edgelm.runtimes.llamacpp import ADAPTER

    candidates = {t: folder / f".candidate-{type_file_name(t)}" for t in types}
    sessions = {}
    try:
        for llama_type, candidate in candidates.items():
            quantize(scratch, candidate, llama_type)
            mark_trusted(candidate)  # written by this process a moment ago
            sessions[llama_type] = ADAPTER.open(candidate, "cpu")
        totals, count = dict.fromkeys(types, 0.0), 0
        for window in windows:
            ids = np.asarray(window, dtype=np.int64).reshape(-1)
            with torch.no_grad():
                source = _log_softmax(model(torch.from_numpy(ids)[None]).logits[0].float().numpy())
            for llama_type, session in sessions.items():
                session.reset()
                theirs = _log_softmax(session.prefill(ids))
                totals[llama_type] += float((np.exp(source) * (source - theirs)).sum())
            count += len(ids)
    finally:
        for session in sessions.values():
            session.close()
    scores = {t: totals[t] / count for t in types}
    best = min(types, key=lambda t: scores[t])  # the first on a tie
    path = folder / type_file_name(best)
    candidates[best].replace(path)
    for candidate in candidates.values():
        candidate.unlink(missing_ok=True)
    return path, best, {t.removeprefix("MOSTLY_"): float(f"{v:.4g}") for t, v in scores.items()}


def write_f32_gguf(model: Any, source: SourceModel, tokenizer_dir: Path, path: Path) -> dict[str, Any]:
    """Write `model` (fp32, in memory) as an F32 GGUF with tokenizer metadata; return notes."""
    import gguf
    import numpy as np

    config = model.config
    from edgelm.architectures import ARCHITECTURES

    row = gguf_architecture(source.model_type)
    arch = gguf.MODEL_ARCH[ARCHITECTURES[source.model_type].gguf_arch.upper()]  # llama.cpp's name, as gguf's enum
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    hparams = row.hparams(config)  # raises UnsupportedError for variants llama.cpp would compute differently
    vocab = read_vocab(tokenizer_dir, int(config.vocab_size))
    vocab.pre = choose_pre_tokenizer(vocab, tokenizer_dir, arch_name)
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_name(source.model_id)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for method, value in hparams:
        getattr(writer, method)(value)
    vocab.write(writer)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if any(hf_name.startswith(p) for p in row.skip_prefixes) or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedError(
                f"the GGUF writer has no llama.cpp name for tensor {hf_name!r} of {source.model_type}"
            )
        data = tensor.detach().float().numpy()
        if row.transform:
            data = row.transform(name, data, config)
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch_name, "tokenizer": vocab.model, "pre_tokenizer": vocab.pre}


def quantize(src: Path, dst: Path, file_type: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer: `src` (F32 GGUF) → `dst` at `file_type` (e.g. MOSTLY_Q4_K_M)."""
    from edgelm.runtimes.llamacpp import llama_library

    llama_cpp = llama_library()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{file_type}")
    params.nthread = threads or os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        dst.unlink(missing_ok=True)
        raise UnsupportedError(f"llama.cpp could not quantize to {file_type} (status {status})")


class GGUFExporter(Exporter):
    format = "gguf"
    runtime = "llama.cpp"
    quants = tuple(QUANT_TYPES)
    # more faithful llama.cpp types tried, in order, when a recipe misses its gate (all smaller than Q8_0)
    fallbacks: ClassVar[dict[str, tuple[str, ...]]] = {"int4": ("Q5_K_M", "Q6_K")}
    measured_choice = ("int4",)  # recipes whose llama.cpp type is chosen on the calibration text
    tasks = ("text-generation", "feature-extraction")  # llama.cpp has no classification-head path for BERT
    requires = ("torch", "transformers", "gguf", "llama_cpp")
    own_options: ClassVar[dict[str, str]] = {"gguf_types": "--gguf-type"}

    def __init__(self) -> None:
        self._notes: dict[Path, dict[str, Any]] = {}  # what write_f32_gguf chose, per scratch file

    def check_type(self, name: str) -> str:
        """Validate a llama.cpp type name for --gguf-type; returns it normalised (upper case)."""
        from edgelm.runtimes.llamacpp import llama_library

        name = name.strip().upper()
        known = sorted(
            n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_library()) if n.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        if name not in known:
            raise UnsupportedError(f"--gguf-type {name}: not a llama.cpp file type; known: {', '.join(known)}")
        return name

    def planned_quants(self, options: Any) -> list[str]:
        return [self.check_type(name) for name in options.gguf_types]

    def gate_recipe(self, quant: str) -> str:
        """The parity gate a file is held to: its --quant recipe's, or the closest one for a named type."""
        if quant in QUANT_TYPES:
            return quant
        return next((g for prefix, g in GATE_BY_TYPE_PREFIX.items() if quant.startswith(prefix)), "int4")

    def export(
        self, model: Any, source: SourceModel, bundle_dir: Path, quant: str, calibration_windows: Any = None
    ) -> ExportedArtifact:
        """`calibration_windows` (token ids, for int4): chooses among INT4_TYPES by measured error."""
        import numpy as np

        folder = bundle_dir / "gguf"
        folder.mkdir(parents=True, exist_ok=True)
        scratch = folder / SCRATCH
        if not scratch.exists():  # one F32 file per bundle; every quant recipe starts from it
            with phase("Writing the F32 GGUF (gguf.GGUFWriter)"):
                self._notes[scratch] = write_f32_gguf(model, source, bundle_dir / "tokenizer", scratch)
        notes = self._notes[scratch]
        path, llama_type, chosen = folder / file_name(quant), file_type(quant), {}
        if quant == "fp32":
            shutil.copyfile(scratch, path)
        elif quant == "int4" and layers_on_the_q4_1_grid(model):
            llama_type, path = ON_GRID_TYPE, folder / type_file_name(ON_GRID_TYPE)
            quantize(scratch, path, llama_type)
            chosen = {"chosen_by": "every layer's weights already sit on Q4_1's grid, which reproduces them"}
        elif quant == "int4" and calibration_windows and source.task == "text-generation":
            types = " and ".join(t.removeprefix("MOSTLY_") for t in INT4_TYPES)
            with phase(f"Quantizing to {types}, keeping the closer on calibration text"):
                path, llama_type, scores = quantize_best(model, scratch, folder, INT4_TYPES, calibration_windows)
            tokens = sum(int(np.asarray(window).size) for window in calibration_windows)
            chosen = {"chosen_by": {"mean_kl_from_source_on_calibration_text": scores, "calibration_tokens": tokens}}
        else:
            quantize(scratch, path, llama_type)
        signature = {
            "kind": "decoder" if source.task == "text-generation" else "encoder",
            "inputs": ["tokens"],
            "outputs": ["logits" if source.task == "text-generation" else "embeddings"],
            "kv_cache": "inside llama.cpp",
            "quantization": {"llama_cpp_file_type": llama_type, "gate_recipe": self.gate_recipe(quant), **chosen},
            **notes,
        }
        return ExportedArtifact(
            path=path, quant=quant, signature=signature, built_by="gguf.GGUFWriter (F32) → llama_model_quantize"
        )

    def finish(self, bundle_dir: Path) -> None:
        """Drop the F32 scratch file the quantizer read from."""
        scratch = bundle_dir / "gguf" / SCRATCH
        scratch.unlink(missing_ok=True)
        self._notes.pop(scratch, None)


EXPORTER = GGUFExporter()
