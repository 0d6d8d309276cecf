"""ONNX exporter: the shared decoder graph → torch.onnx (dynamo) → quantized → ORT-optimized.

Quant mapping (DESIGN.md, adjusted to what measured faithful on this model family):
  fp32 → float; fp16 → float16 weights (float32 inputs/outputs);
  int8 → MatMulNBits 8-bit weight-only, block 32, accuracy_level 4 (int8 compute).
         onnxruntime's default `quantize_dynamic` loses 71% perplexity on SmolLM2 (BASELINES.md),
         8-bit weight-only keeps it within 1%, so that is what int8 means here;
  int4 → MatMulNBits 4-bit, block 32, asymmetric, accuracy_level 4, output projection 8-bit.
The stored file is already graph-optimized (basic level, portable across CPUs), so loading
does not re-optimize.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgelm.errors import UnsupportedError
from edgelm.exporter import ExportedArtifact
from edgelm.graph import decoder_signature
from edgelm.model import SourceModel

FILE_NAMES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_q8.onnx", "int4": "model_q4.onnx"}
NBITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
TIED_TABLE = "embedding_t"  # edgelm.graph's name for a tied embedding table


@contextlib.contextmanager
def _quiet_logger(name: str, level: int) -> Iterator[None]:
    """Raise a library logger's threshold for the duration (restored even on error)."""
    log = logging.getLogger(name)
    previous = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(previous)


def export_decoder_onnx(model: Any, path: Path) -> None:
    """Export the fp32 decoder graph of `model` to `path`."""
    import torch

    from edgelm.graph import build_decoder_graph, example_inputs

    graph = build_decoder_graph(model)
    sig = graph.signature
    n = torch.export.Dim("n", min=1, max=sig.max_context)
    past = torch.export.Dim("past_len", min=0, max=sig.max_context)
    dynamic = ({1: n}, tuple({2: past} for _ in sig.past_names()))
    # The exporter prints progress lines, warns about optional torchvision ops and pytree
    # deprecations; none of it is actionable for an edgelm user, and it would tear the progress display.
    with _quiet_logger("torch.onnx", logging.ERROR), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, example_inputs(sig), input_names=["input_ids", *sig.past_names()],
            output_names=["logits", *sig.present_names()], dynamo=True, dynamic_shapes=dynamic, optimize=True,
        )
        program.save(str(path))


def quantize_weights(src: Path, dst: Path, quant: str) -> dict[str, Any]:
    """Write `src` quantized per `quant` to `dst`; return what was done (for the manifest)."""
    import onnx

    model = onnx.load(str(src))
    if quant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
        done = {"weights": "float16", "io": "float32"}
    else:
        # The output projection decides every token; like llama.cpp's Q4_K_M (which keeps it
        # at 6 bits), int4 keeps it at 8 bits and quantizes the transformer layers to 4.
        from onnx import numpy_helper

        from edgelm.exporters.onnx_block_bias import add_block_bias_correction
        from edgelm.exporters.onnx_shared_embedding import share_quantized_embedding

        head = [n.name for n in model.graph.node if "logits" in n.output and n.op_type == "MatMul"]
        bits_for_head = 8
        corrected = 0
        if NBITS[quant] == bits_for_head:
            model = _matmul_nbits(model, bits_for_head)
        else:
            # the bias correction needs the float weights the quantizer is about to replace
            weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2}
            model = _matmul_nbits(model, NBITS[quant], exclude=head)
            model = _matmul_nbits(model, bits_for_head, include=head)
            corrected = add_block_bias_correction(model, weights)
        shared = share_quantized_embedding(model, TIED_TABLE)
        done = {"op": "MatMulNBits", "bits": NBITS[quant], "output_projection_bits": bits_for_head,
                "block_size": BLOCK_SIZE, "symmetric": False, "accuracy_level": 4,
                "embedding_lookup": "GatherBlockQuantized on the 8-bit head (tied)" if shared else "float32",
                "block_bias_correction": corrected}
    onnx.save(model, str(dst))
    return done


def _matmul_nbits(model: Any, bits: int, include: list[str] | None = None, exclude: list[str] | None = None) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantizer logs every node it visits at INFO; that would bury edgelm's progress display.
    with _quiet_logger("onnxruntime.quantization.matmul_nbits_quantizer", logging.WARNING):
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=False,
                                         accuracy_level=4, nodes_to_include=include, nodes_to_exclude=exclude or [])
        quantizer.process()
    return quantizer.model.model


def optimize_offline(path: Path) -> None:
    """Apply onnxruntime's portable (basic) graph optimizations once and store the result."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    tmp = path.with_suffix(".opt.onnx")
    options.optimized_model_filepath = str(tmp)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tmp.replace(path)


class OnnxExporter:
    format = "onnx"
    runtime = "onnxruntime"
    quants = ("fp32", "fp16", "int8", "int4")
    requires = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")

    def export(self, model: Any, source: SourceModel, bundle_dir: Path, quant: str) -> ExportedArtifact:
        if source.task != "text-generation":
            raise UnsupportedError("the ONNX exporter handles decoders only in this edgelm; encoders are planned")
        folder = bundle_dir / "onnx"
        folder.mkdir(parents=True, exist_ok=True)
        # One fp32 export per bundle; every quant recipe starts from it.
        scratch = folder / ".fp32-source.onnx"
        if not scratch.exists():
            export_decoder_onnx(model, scratch)
        path = folder / FILE_NAMES[quant]
        if quant == "fp32":
            shutil.copyfile(scratch, path)
            recipe: dict[str, Any] = {"weights": "float32"}
        else:
            recipe = quantize_weights(scratch, path, quant)
        optimize_offline(path)
        signature = decoder_signature(model.config).to_dict()
        opset = _stamp_metadata(path, {"max_context": signature["max_context"], "quant": quant})
        return ExportedArtifact(path=path, quant=quant,
                                signature={**signature, "quantization": recipe, "opset": opset},
                                built_by="edgelm.graph → torch.onnx.export(dynamo=True)")

    def finish(self, bundle_dir: Path) -> None:
        """Drop the unoptimized fp32 scratch copy used as the quantizers' source."""
        (bundle_dir / "onnx" / ".fp32-source.onnx").unlink(missing_ok=True)


def _stamp_metadata(path: Path, values: dict[str, Any]) -> int:
    """Store what the runtime needs to know (max context) inside the model file itself, and
    return the file's ai.onnx opset (read from the same load)."""
    import json

    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "edgelm", json.dumps(values)
    onnx.save(proto, str(path))
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


EXPORTER = OnnxExporter()
