"""ONNX exporter: the shared decoder or encoder graph → torch.onnx (dynamo) → quantized → ORT-optimized.

Quant mapping (the README's recipes, adjusted to what measured faithful on this model family):
  fp32 → float; fp16 → float16 weights (float32 inputs/outputs);
  int8 → MatMulNBits 8-bit weight-only, block 32, accuracy_level 4 (int8 compute).
         onnxruntime's default `quantize_dynamic` loses 71% perplexity on SmolLM2 (peer baselines, README),
         8-bit weight-only keeps it within 1%, so that is what int8 means here;
  int4 → MatMulNBits 4-bit, block 32, asymmetric, accuracy_level 4, output projection 8-bit.
The stored file is already graph-optimized (basic level, portable across CPUs), so loading
does not re-optimize. Models over 1.8 GB of weights keep them in `<file>.data` beside the
graph (ONNX external data; the runtime refuses any location outside the model's folder).
Each artifact has its own folder (`onnx/int4/model_q4.onnx`), where a decoder's also gets the
genai_config.json and tokenizer files onnxruntime-genai loads it with. A decoder's attention is
onnxruntime's GroupQueryAttention (exporters/onnx_gqa.py), so onnxruntime-genai runs it with one
KV buffer shared by past and present, as it runs its own model builder's files. Before
quantization the projections that read one input become one MatMul (exporters/onnx_fusion.py):
q|k|v packed into the attention node, gate|up one MatMul and a Split.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgelm.architectures import TASK_MODEL_CLASSES
from edgelm.encoder_graph import encoder_signature
from edgelm.exporter import ExportedArtifact, Exporter
from edgelm.graph import decoder_signature
from edgelm.model import SourceModel
from edgelm.native_log import quiet_library_output
from edgelm.steps import phase

SCRATCH = ".fp32-source.onnx"
FILE_NAMES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_q8.onnx", "int4": "model_q4.onnx"}
NBITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
HEAD_BITS = 8  # the output projection of int4 and int8 alike
TIED_TABLE = "embedding_t"  # edgelm.graph's name for a tied embedding table
# Above this many weight bytes a model is saved with external data (protobuf's limit is 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _export_graph(
    graph: Any,
    inputs: tuple,
    input_names: list[str],
    output_names: list[str],
    dynamic: tuple,
    path: Path,
    translations: dict[Any, Any] | None = None,
    fuse: bool = False,
) -> None:
    import torch

    # The exporter prints progress lines, warns about optional torchvision ops and pytree
    # deprecations; none of it is actionable for an edgelm user, and it would tear the progress display.
    with quiet_library_output(("torch.onnx",)):
        program = torch.onnx.export(
            graph,
            inputs,
            input_names=input_names,
            output_names=output_names,
            dynamo=True,
            dynamic_shapes=dynamic,
            optimize=True,
            custom_translation_table=translations,
        )
        if fuse:
            fuse_normalizations(program.model)
        program.save(str(path))


def fuse_normalizations(model: Any) -> None:
    """onnxruntime's fused normalization ops in place of the graph's elementwise ones, through
    onnxscript's own rewrite rules (the ones torch.onnx's optimizer leaves for onnxruntime):
    RMSNorm → SimplifiedLayerNormalization, residual add + RMSNorm → SkipSimplifiedLayerNormalization,
    as in onnxruntime-genai's model builder's graphs. A decoder step is hundreds of tiny ops;
    onnxruntime pays a dispatch for each, and this removes six of every norm's seven (all 61 of
    SmolLM2's norms). Patterns that do not match (another norm) stay as they are."""
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    fuse_rms_normalization(model)
    fuse_skip_rms_normalization(model)  # after the plain fusion: it matches Add + SimplifiedLayerNormalization


def export_decoder_onnx(model: Any, path: Path) -> None:
    """Export the fp32 decoder graph of `model` to `path` (attention as GroupQueryAttention)."""
    import torch

    from edgelm.exporters.onnx_gqa import translation_table
    from edgelm.graph import build_decoder_graph, example_inputs

    graph = build_decoder_graph(model)
    sig = graph.signature
    n = torch.export.Dim("n", min=1, max=sig.max_context)
    past = torch.export.Dim("past_len", min=0, max=sig.max_context)
    total = torch.export.Dim("total_len", min=1, max=2 * sig.max_context)
    dynamic = ({1: n}, ({1: total}, *({2: past} for _ in sig.past_names())))
    names = ["input_ids", "attention_mask", *sig.past_names()]
    outputs = ["logits", *sig.present_names()]
    _export_graph(graph, example_inputs(sig), names, outputs, dynamic, path, translation_table(), fuse=True)


def export_encoder_onnx(model: Any, task: str, path: Path) -> None:
    """Export the fp32 encoder graph of `model` for `task` to `path` (dynamic batch and length)."""
    import torch

    from edgelm.encoder_graph import INPUT_NAMES, EncoderGraph, example_encoder_inputs

    graph = EncoderGraph(model, task).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    n = torch.export.Dim("n", min=1, max=graph.signature.max_length)
    _export_graph(
        graph,
        example_encoder_inputs(),
        list(INPUT_NAMES),
        [graph.signature.output],
        ({0: batch, 1: n}, {0: batch, 1: n}),
        path,
    )


def save_model(proto: Any, path: Path) -> list[Path]:
    """Save `proto` at `path`; weights go to `<name>.data` beside it when the model is too big
    for one protobuf (2 GB). Returns the extra files written."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    weight_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    if weight_bytes <= EXTERNAL_DATA_BYTES:
        onnx.save(proto, str(path))
        return []
    onnx.save(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return [data]


def layer_matmuls(model: Any, layers: tuple[int, ...]) -> list[str]:
    """Names of the MatMul nodes inside the given decoder/encoder layers, read from the scope
    torch.onnx records on each node (`body.layers.3.mlp.down_proj`, `layer.3.attention...`)."""
    import re

    wanted = set(layers)
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        found = re.search(r"\blayers?\.(\d+)\.", scopes)
        if found and int(found.group(1)) in wanted:
            names.append(node.name)
    return names


def _integer_matmuls(
    model: Any,
    quant: str,
    layers_8bit: tuple[int, ...],
    weights: Mapping[str, Any],
    modules: dict[str, str],
    hessians: dict[str, Any] | None,
) -> tuple[Any, int, set[str]]:
    """MatMulNBits for every weight MatMul: (the model, layers block-bias corrected, layers that
    took GPTQ's codes). The output projection decides every token; like llama.cpp's Q4_K_M
    (which keeps it at 6 bits), int4 keeps it at HEAD_BITS and quantizes the transformer layers to 4.
    `weights` and `modules` (int4): the fp32 weights the quantizer is about to replace and the
    source Linears they are, by initializer name (source_weights), for the bias correction and GPTQ."""
    from edgelm.exporters.onnx_block_bias import add_block_bias_correction

    if NBITS[quant] == HEAD_BITS:
        return _matmul_nbits(model, HEAD_BITS), 0, set()
    head = [n.name for n in model.graph.node if "logits" in n.output and n.op_type == "MatMul"]
    eight = head + layer_matmuls(model, layers_8bit)
    model = _matmul_nbits(model, NBITS[quant], exclude=eight)
    model = _matmul_nbits(model, HEAD_BITS, include=eight)
    recoded: set[str] = set()
    if hessians:
        from edgelm.exporters.onnx_gptq import apply_gptq

        recoded = apply_gptq(model, weights, hessians, modules)
    corrected = add_block_bias_correction(model, weights, skip=recoded)
    return model, corrected, recoded


def source_weights(model: Any, source: Any | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(the fp32 [K, N] weight of every MatMul of `model` by initializer name, the torch Linear
    of `source` each one is, by the same name).

    A weight found in `source` (the torch model the graph was exported from, matched by its
    bytes) is a view of that Linear's weight, not a copy: copied, they were a second 2.4 GB
    beside the graph being quantized at 0.5B parameters. Others are copied from the graph."""
    import torch
    from onnx import numpy_helper

    from edgelm.gptq import weight_fingerprint

    linears = {
        weight_fingerprint(module.weight.detach().T.numpy()): (name, module.weight.detach().numpy().T)
        for name, module in (source.named_modules() if source is not None else ())
        if isinstance(module, torch.nn.Linear)
    }
    inits = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
    weights: dict[str, Any] = {}
    modules: dict[str, str] = {}
    for name in {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}:
        graph_weight = numpy_helper.to_array(inits[name])
        found = linears.get(weight_fingerprint(graph_weight))
        if found is None:
            weights[name] = graph_weight
        else:
            modules[name], weights[name] = found
    return weights, modules


def quantize_weights(
    src: Path,
    dst: Path,
    quant: str,
    layers_8bit: tuple[int, ...] = (),
    source: Any | None = None,
    hessians: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `src` to `dst` with the projections that read one input fused (exporters/onnx_fusion.py)
    and the weights quantized per `quant`; return what was done (for the manifest).

    `layers_8bit` (int4 only): layers whose matrices stay 8-bit (mixed precision). `source`:
    the torch model `src` was exported from (its weights are read instead of copies of the
    graph's). `hessians` (int4 only, with `source`): the Hessians of its Linears by module
    name; each 4-bit layer then keeps GPTQ's codes on onnxruntime's own grid or
    round-to-nearest with the block-bias correction, whichever errs less on the calibration
    inputs (exporters/onnx_gptq.py); the two are not combined (the block bias undoes part of
    GPTQ's compensation: simulated on the mild off-grid twin, 1.0765 with it, 1.0652 without)."""
    import onnx

    from edgelm.exporters.onnx_fusion import FusedWeights, fuse_projections, fused_modules

    model = onnx.load(str(src))
    # matched to the source's Linears by their bytes, so before any weight is fused
    weights, modules = source_weights(model, source) if NBITS.get(quant) == 4 else ({}, {})
    parts = fuse_projections(model)
    fused = {"fused_projections": len(parts)}
    if quant == "fp32":
        done: dict[str, Any] = {"weights": "float32", **fused}
    elif quant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
        done = {"weights": "float16", "io": "float32", **fused}
    else:
        model, corrected, recoded = _integer_matmuls(
            model, quant, layers_8bit, FusedWeights(weights, parts), fused_modules(modules, parts), hessians
        )
        done = {
            "op": "MatMulNBits",
            "bits": NBITS[quant],
            "output_projection_bits": HEAD_BITS,
            "block_size": BLOCK_SIZE,
            "symmetric": False,
            "accuracy_level": 4,
            "block_bias_correction": corrected,
            **fused,
            **({"layers_at_8_bits": list(layers_8bit)} if layers_8bit else {}),
            **({"gptq_layers": len(recoded)} if NBITS[quant] == 4 and hessians is not None else {}),
        }
    done["external_data"] = bool(save_model(model, dst))
    return done


def _matmul_nbits(model: Any, bits: int, include: list[str] | None = None, exclude: list[str] | None = None) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantizer logs every node it visits at INFO; that would bury edgelm's progress display.
    with quiet_library_output(("onnxruntime.quantization.matmul_nbits_quantizer",)):
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=BLOCK_SIZE,
            is_symmetric=False,
            accuracy_level=4,
            nodes_to_include=include,
            nodes_to_exclude=exclude or [],
        )
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


class OnnxExporter(Exporter):
    format = "onnx"
    runtime = "onnxruntime"
    quants = ("fp32", "fp16", "int8", "int4")
    tasks = tuple(TASK_MODEL_CLASSES)  # every task edgelm knows
    requires = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")
    mixed_precision = ("int4",)  # can keep chosen layers at 8 bits (export's layers_8bit)
    gptq = ("int4",)  # calibrated attempts pick 4-bit codes by GPTQ (export's hessians)

    def export(
        self,
        model: Any,
        source: SourceModel,
        bundle_dir: Path,
        quant: str,
        layers_8bit: tuple[int, ...] = (),
        hessians: dict[str, Any] | None = None,
    ) -> ExportedArtifact:
        folder = bundle_dir / "onnx"
        folder.mkdir(parents=True, exist_ok=True)
        decoder = source.task == "text-generation"
        # One fp32 export per bundle; every quant recipe starts from it.
        scratch = folder / SCRATCH
        if not scratch.exists():
            with phase("Exporting the fp32 graph (torch.onnx, dynamo)"):
                if decoder:
                    export_decoder_onnx(model, scratch)
                else:
                    export_encoder_onnx(model, source.task, scratch)
        # one folder per artifact: onnxruntime-genai reads one genai_config.json per folder, which
        # must name a model file inside that folder (edgelm.vendors.onnxruntime_genai writes it)
        path = folder / quant / FILE_NAMES[quant]
        path.parent.mkdir(exist_ok=True)
        gptq = hessians if quant == "int4" else None
        with phase(f"Fusing and quantizing the weights ({quant}{', GPTQ' if gptq else ''})"):
            recipe = quantize_weights(scratch, path, quant, layers_8bit, model, gptq)
        # onnxruntime cannot write a >2 GB optimized model in place; such models are optimized at load.
        recipe["optimized_offline"] = not recipe["external_data"]
        if recipe["optimized_offline"]:
            with phase("Optimizing the graph offline (onnxruntime)"):
                optimize_offline(path)
        signature = (
            decoder_signature(model.config).to_dict()
            if decoder
            else encoder_signature(model.config, source.task).to_dict()
        )
        max_context = signature["max_context" if decoder else "max_length"]
        opset, extra, fused, shared = _finish_file(
            path, {"max_context": max_context, "quant": quant, "task": source.task}
        )
        if quant in NBITS:
            recipe["embedding_lookup"] = "GatherBlockQuantized on the 8-bit head (tied)" if shared else "float32"
        return ExportedArtifact(
            path=path,
            quant=quant,
            extra_files=extra,
            signature={**signature, "quantization": recipe, "opset": opset, "fused_ops": fused},
            built_by=f"{'edgelm.graph' if decoder else 'edgelm.encoder_graph'} → torch.onnx.export(dynamo=True)",
        )

    def finish(self, bundle_dir: Path) -> None:
        """Drop the unoptimized fp32 scratch copy used as the quantizers' source."""
        for scratch in (bundle_dir / "onnx").glob(SCRATCH + "*"):  # with its .data, if any
            scratch.unlink()


FUSED_OPS = ("GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def drop_unused_norm_outputs(proto: Any) -> None:
    """Unname the fused norms' optional outputs no node reads (each norm's mean and inverse
    standard deviation, as onnxscript's fusion names them): onnxruntime allocates and writes every
    named output, and a step runs 61 of these norms. onnxruntime-genai's builder leaves them
    unnamed too."""
    read = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type in NORMS:
            for index in range(1, len(node.output)):
                if node.output[index] not in read:
                    node.output[index] = ""


def _finish_file(path: Path, values: dict[str, Any]) -> tuple[int, list[Path], dict[str, int], bool]:
    """The stored file's last rewrite: a tied model's input lookup reads the quantized head
    (exporters/onnx_shared_embedding.py), the norms' unread outputs go unnamed, and what the
    runtime needs to know (max context, task) is stored inside the file itself.

    The lookup is rewired after the offline optimization, not before: its Reshapes of the head's
    bytes would be constant-folded into a second copy of the table (28 MB of SmolLM2's 147 MB
    int4 file). Returns the file's ai.onnx opset (read from the same load), its external data
    files, how many of onnxruntime's fused ops (FUSED_OPS) it holds, and whether the lookup shares
    the head's bytes.
    """
    import json

    import onnx

    from edgelm.exporters.onnx_shared_embedding import share_quantized_embedding

    proto = onnx.load(str(path))
    shared = share_quantized_embedding(proto, TIED_TABLE)
    drop_unused_norm_outputs(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "edgelm", json.dumps(values)
    extra = save_model(proto, path)
    fused = {op: sum(n.op_type == op for n in proto.graph.node) for op in FUSED_OPS}
    return (
        next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0),
        extra,
        {op: count for op, count in fused.items() if count},
        shared,
    )


EXPORTER = OnnxExporter()
