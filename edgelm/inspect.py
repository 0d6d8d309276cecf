"""`edgelm inspect`: describe a bundle or model file from its headers, without running it."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidModelError, UnsupportedError
from edgelm.model import require_regular_file

Rows = list[tuple[str, Any]]


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _number(value: Any, digits: int) -> str:
    """A manifest figure for display: rounded when it is a number, else shown as it is (a
    hand-edited manifest may hold anything there)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(round(value, digits))
    return str(value)[:20]


def _describe_bundle(path: Path) -> tuple[str, Rows]:
    from edgelm.bundle import read_bundle

    manifest = read_bundle(path)
    rows: Rows = [
        (
            "source",
            f"{manifest.source['model_id']} ({manifest.source['model_type']}, "
            f"{manifest.source['num_parameters'] / 1e6:.1f} M params)",
        ),
        ("target", manifest.target),
        ("edgelm", manifest.edgelm_version),
        ("files verified", f"{len(manifest.files)} (sha256)"),
    ]
    for a in manifest.artifacts:
        ratio = _number((a.parity or {}).get("ppl_ratio"), 4)
        speed = _number((a.profile or {}).get("decode_tok_s"), 1)
        rows.append(
            (a.name, f"{a.path}  {a.bytes / 1e6:.1f} MB  runtime={a.runtime}  ppl_ratio={ratio}  decode={speed} tok/s")
        )
    return f"bundle {path}", rows


def _describe_gguf(path: Path) -> tuple[str, Rows]:
    from edgelm.gguf_header import read_gguf_summary

    summary = read_gguf_summary(path)  # defensive: a hostile header is an InvalidModelError
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        def describe_type(t: int) -> tuple[str, float]:  # name, bytes per element
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
            return GGMLQuantizationType(t).name, size / block
    except ImportError:  # runtime-only install: ids and element counts only

        def describe_type(t: int) -> tuple[str, float]:
            return str(t), 0.0

    counts: Counter[str] = Counter()
    type_bytes: Counter[str] = Counter()
    for tensor in summary.tensors:
        name, per_element = describe_type(tensor.ggml_type)
        counts[name] += 1
        type_bytes[name] += int(math.prod(tensor.shape) * per_element)
    keep = ("general.architecture", "general.name", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre")
    rows: Rows = [
        ("version", summary.version),
        ("size", f"{summary.file_bytes / 1e6:.1f} MB"),
        ("tensors", len(summary.tensors)),
        ("parameters", f"{summary.num_parameters / 1e6:.1f} M"),
        (
            "tensor types",
            ", ".join(f"{k}×{counts[k]} ({type_bytes[k] / 1e6:.1f} MB)" for k, _ in type_bytes.most_common()),
        ),
    ]
    rows += [(k, summary.metadata[k]) for k in keep if k in summary.metadata]
    rows += [
        (k, v)
        for k, v in summary.metadata.items()
        if k.endswith(
            (
                ".context_length",
                ".block_count",
                ".embedding_length",
                ".head_count",
                ".head_count_kv",
                ".feed_forward_length",
                ".rope.freq_base",
                ".pooling_type",
            )
        )
    ]
    return f"gguf {path}", rows


def _describe_safetensors(path: Path) -> tuple[str, Rows]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            names = list(fh.keys())
            dtypes = Counter(fh.get_slice(n).get_dtype() for n in names)
            params = 0
            for n in names:
                count = 1
                for d in fh.get_slice(n).get_shape():
                    count *= d
                params += count
    except Exception as err:
        raise InvalidModelError(f"{path}: not a readable safetensors file ({err})") from err
    return f"safetensors {path}", [
        ("size", f"{path.stat().st_size / 1e6:.1f} MB"),
        ("tensors", len(names)),
        ("parameters", f"{params / 1e6:.1f} M"),
        ("dtypes", ", ".join(f"{k}×{v}" for k, v in dtypes.items())),
    ]


def _describe_onnx(path: Path) -> tuple[str, Rows]:
    try:
        import onnx
    except ImportError as err:
        raise UnsupportedError("inspecting .onnx files needs the onnx package: install `edgelm[onnx]`") from err
    from edgelm.runtimes.onnxruntime import load_onnx_graph

    proto = load_onnx_graph(path)
    ops = Counter(n.op_type for n in proto.graph.node)
    quantized = {
        op: ops[op] for op in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul") if op in ops
    }
    names = {value: name for name, value in onnx.TensorProto.DataType.items()}
    dtypes = Counter(names.get(t.data_type, f"type {t.data_type}") for t in proto.graph.initializer)

    def shape(v: Any) -> str:  # protobuf hands undecodable strings back as bytes
        dims = [_text(d.dim_param) or str(d.dim_value) for d in v.type.tensor_type.shape.dim]
        return f"{_text(v.name)}[{','.join(dims)}]"

    inputs = [shape(v) for v in proto.graph.input]
    outputs = [shape(v) for v in proto.graph.output]
    return f"onnx {path}", [
        ("size", f"{path.stat().st_size / 1e6:.1f} MB"),
        ("opset", ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import)),
        ("inputs", ", ".join(inputs[:3]) + (f" … ({len(inputs)} in all)" if len(inputs) > 3 else "")),
        ("outputs", ", ".join(outputs[:3]) + (f" … ({len(outputs)} in all)" if len(outputs) > 3 else "")),
        ("quantized ops", ", ".join(f"{k}×{v}" for k, v in quantized.items()) or "none"),
        ("initializer types", ", ".join(f"{k}×{v}" for k, v in dtypes.items())),
        ("nodes", sum(ops.values())),
        ("metadata", {p.key: p.value for p in proto.metadata_props}),
    ]


def _describe_pte(path: Path) -> tuple[str, Rows]:
    """Methods, delegates, operators and size of an ExecuTorch program, after the runtime's own
    verified load (a truncated or foreign file is an InvalidModelError first)."""
    from edgelm.isolation import probe, runs_here
    from edgelm.runtimes.executorch import LOG_VARIABLE, load_program, quiet_native_stderr

    if runs_here(path):
        load_program(path)
    else:
        probe("executorch", path)  # its verified load, in a child: the native loader can end the process
    from executorch.exir._serialize._program import deserialize_pte_binary

    try:
        with quiet_native_stderr(LOG_VARIABLE):
            program = deserialize_pte_binary(path.read_bytes()).program
    except Exception as err:  # executorch's pure-Python reader: any error means bytes it cannot describe
        raise InvalidModelError(
            f"{path}: the program's tables cannot be read ({type(err).__name__}); re-export it"
        ) from err
    rows: Rows = [
        ("size", f"{path.stat().st_size / 1e6:.1f} MB"),
        ("methods", ", ".join(plan.name for plan in program.execution_plan)),
    ]
    for plan in program.execution_plan:
        delegates = Counter(d.id for d in plan.delegates)
        if plan.name == "forward":
            rows += [
                ("forward inputs / outputs", f"{len(plan.inputs)} / {len(plan.outputs)}"),
                ("delegates", ", ".join(f"{k}×{v}" for k, v in delegates.items()) or "none"),
                ("operators outside delegates", ", ".join(sorted({str(o.name) for o in plan.operators})) or "none"),
            ]
    return f"executorch {path}", rows


def _describe_model_folder(path: Path) -> tuple[str, Rows]:
    from edgelm.model import inspect_source

    source = inspect_source(path)
    return f"model {path}", [(k, v) for k, v in source.to_dict().items()]


def _describe_tflite(path: Path) -> tuple[str, Rows]:
    """Signatures, weight types, operators and size of a TFLite model, from the verified
    flatbuffer (a truncated or foreign file is an InvalidModelError first)."""
    from edgelm.tflite_file import read_tflite

    summary = read_tflite(path)

    def shortened(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" … ({len(names)} in all)" if len(names) > 3 else "")

    return f"tflite {path}", [
        ("size", f"{summary.bytes / 1e6:.1f} MB"),
        ("signatures", ", ".join(sorted(summary.signatures))),
        *[
            (f"{name} inputs / outputs", f"{shortened(ins)} / {shortened(outs)}")
            for name, (ins, outs) in sorted(summary.signatures.items())
        ],
        # what one call runs: a decode step's op count is what its per-op overhead scales with
        *[(f"{name} operators", str(count)) for name, count in sorted(summary.signature_operators.items())],
        (
            "weight types",
            ", ".join(
                f"{k}×{summary.tensor_types[k]} ({v / 1e6:.1f} MB)" for k, v in summary.weight_bytes.most_common()
            ),
        ),
        ("operators", ", ".join(f"{k}×{v}" for k, v in summary.operators.most_common())),
    ]


# file suffix -> describer; a format adds one line here.
DESCRIBERS = {
    ".gguf": _describe_gguf,
    ".safetensors": _describe_safetensors,
    ".onnx": _describe_onnx,
    ".pte": _describe_pte,
    ".tflite": _describe_tflite,
}


def describe(path: Path) -> tuple[str, Rows]:
    """(title, rows) describing a bundle, model folder or artifact file."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file or folder")
    if not path.is_dir():
        require_regular_file(path)  # a FIFO or device named model.gguf would block the reader forever
    if path.is_dir():
        return _describe_bundle(path) if (path / "manifest.json").is_file() else _describe_model_folder(path)
    if path.suffix in DESCRIBERS:
        return DESCRIBERS[path.suffix](path)
    raise UnsupportedError(
        f"{path}: cannot inspect {path.suffix or 'this'} files; known: bundle folders, model folders, "
        + ", ".join(DESCRIBERS)
    )
