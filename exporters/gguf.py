"""GGUF exporter: the source state dict → an F32 GGUF (gguf package) → llama.cpp's quantizer.

Quant mapping (the README's recipes): fp32 → F32, fp16 → F16, int8 → Q8_0, int4 → Q4_K_M. Every
recipe starts from one F32 file written from the fp32 source model, so the k-quants are
llama.cpp's own (`llama_model_quantize`, via llama-cpp-python), not a re-implementation.
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
from edgelm.model import SourceModel

from .gguf_arch import gguf_architecture
from .gguf_vocab import choose_pre_tokenizer, read_vocab

# --quant -> llama.cpp file type (llama_cpp.LLAMA_FTYPE_<name>)
QUANT_TYPES = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "int8": "MOSTLY_Q8_0", "int4": "MOSTLY_Q4_K_M"}
SCRATCH = ".f32-source.gguf"


# llama.cpp type name prefix -> the --quant recipe whose parity gate it is held to
GATE_BY_TYPE_PREFIX = {"F32": "fp32", "F16": "fp16", "BF16": "fp16", "Q8": "int8", "Q6": "int8", "Q5": "int8"}


def file_type(quant: str) -> str:
    """llama.cpp file type for a --quant recipe or a llama.cpp type name (Q4_0, IQ4_NL, ...)."""
    return QUANT_TYPES.get(quant) or f"MOSTLY_{quant}"


def file_name(quant: str) -> str:
    return f"model-{file_type(quant).removeprefix('MOSTLY_').removeprefix('ALL_')}.gguf"


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

    def export(self, model: Any, source: SourceModel, bundle_dir: Path, quant: str) -> ExportedArtifact:
        folder = bundle_dir / "gguf"
        folder.mkdir(parents=True, exist_ok=True)
        scratch = folder / SCRATCH
        if not scratch.exists():  # one F32 file per bundle; every quant recipe starts from it
            self._notes[scratch] = write_f32_gguf(model, source, bundle_dir / "tokenizer", scratch)
        notes = self._notes[scratch]
        path = folder / file_name(quant)
        if quant == "fp32":
            shutil.copyfile(scratch, path)
        else:
            quantize(scratch, path, file_type(quant))
        signature = {
            "kind": "decoder" if source.task == "text-generation" else "encoder",
            "inputs": ["tokens"],
            "outputs": ["logits" if source.task == "text-generation" else "embeddings"],
            "kv_cache": "inside llama.cpp",
            "quantization": {"llama_cpp_file_type": file_type(quant), "gate_recipe": self.gate_recipe(quant)},
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
