"""TFLite / LiteRT exporter: the shared decoder graph in LiteRT-LM's layout → litert-torch
→ a .tflite with two signatures → ai-edge-quantizer for the integer recipes.

The file is what LiteRT-LM's executor runs (edgelm.vendors.litert_lm packs it into a
.litertlm) and what edgelm's own LiteRT session runs, in the same way: every layer's whole
key and value cache of a fixed `max_context` positions goes in and comes out updated under
the same name (`kv_cache_k_<i>`, `kv_cache_v_<i>`), and the runtime binds each output to its
input's buffer, so a step writes only its new positions. Two signatures share the weights:

    prefill(tokens[1, PREFILL_LENGTH], input_pos[PREFILL_LENGTH], kv_cache_*) -> logits, kv_cache_*
    decode(tokens[1, 1], input_pos[1], kv_cache_*)                           -> logits, kv_cache_*

Inputs are int32. A prompt chunk shorter than PREFILL_LENGTH is padded after the real tokens
(LiteRT-LM pads with token 0 at position 0); the new keys/values are written from
input_pos[0] on, so the padding lands past the real positions, masked until overwritten.

Quant mapping (the README's recipes), applied to the float flatbuffer with ai-edge-quantizer:
  fp32 → float; fp16 → float16 weights (computed in float32: XNNPACK's default);
  int8 → dynamic range: int8 per-channel weights, activations quantized on the fly;
  int4 → 4-bit blockwise (blocks of 32) weights for the transformer layers with a float offset
         per block, int8 dynamic activations; the output projection and embedding stay int8
         per channel (exporters/tflite_int4.py: edgelm picks the grid and, calibrated, GPTQ's
         codes; ai-edge-quantizer stores them exactly).
Embedding lookup and output projection share one [vocab, hidden] buffer when tied, and both
ops are quantized with the rest.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from edgelm.architectures import lookup_architecture
from edgelm.background import memory_holds
from edgelm.errors import UnsupportedError
from edgelm.exporter import ExportedArtifact, Exporter
from edgelm.graph import decoder_signature
from edgelm.model import SourceModel, copy_sharing_weights, quiet_noisy_imports
from edgelm.native_log import quiet_library_output, quiet_native_stderr
from edgelm.runtimes.litert import LOG_VARIABLE
from edgelm.steps import phase

HOST_CONTEXT = 1024  # cache positions (bounded by the model's own maximum); recorded in the manifest
PREFILL_LENGTH = 128  # tokens per prefill call; longer prompts run in chunks
FILE_NAMES = {
    "fp32": "model.tflite",
    "fp16": "model_fp16.tflite",
    "int8": "model_int8.tflite",
    "int4": "model_int4.tflite",
}
SIGNATURES = ("prefill", "decode")
FUSED_COPY_FACTOR = 4  # the fused Linears (0.8x the weights) and the conversion's peak (3.1x), rounded up
FUSION_SKIPPED = "no: the memory available could not hold a fused copy beside the conversion"
ENCODER_PREFIX = "encode_"  # encoders: one signature per padded input length, e.g. encode_128
ENCODER_LENGTHS = (32, 64, 128, 256, 512)
# What each recipe asks of ai-edge-quantizer: (mode, bits, granularity name)
QUANT_RECIPES = {
    "fp16": ("float_casting", 16, "CHANNELWISE"),
    "int8": ("dynamic", 8, "CHANNELWISE"),
    "int4": ("dynamic", 4, "BLOCKWISE_32"),  # the block-grid layers; the rest as int8
}


def convert_decoder(model: Any, path: Path) -> dict[str, Any]:
    """Convert `model` to a float .tflite with prefill and decode signatures at `path`, in
    LiteRT-LM's tensor names and cache convention (edgelm.decoder_graph.LiteRtLmSteps)."""
    import torch

    from edgelm.decoder_graph import InPlaceCache, LiteRtLmSteps
    from edgelm.graph import build_decoder_graph

    signature = decoder_signature(model.config)
    context = min(HOST_CONTEXT, signature.max_context)
    # the model's own Embedding and output Linear: the converter turns them into EMBEDDING_LOOKUP and
    # FULLY_CONNECTED over one [vocab, hidden] buffer when tied (a transposed copy would be folded
    # into a separate constant per signature), and the quantizer handles both ops
    steps = LiteRtLmSteps(build_decoder_graph(model, in_place_context=context, separate_head=True)).eval()
    shapes = InPlaceCache.cache_shapes(signature.num_kv_heads, context, signature.head_dim)
    cache = {f"{kind}_{i}": torch.zeros(shapes[kind]) for i in range(signature.num_layers) for kind in ("k", "v")}

    def inputs(length: int) -> dict[str, Any]:
        return {
            "tokens": torch.zeros((1, length), dtype=torch.int32),
            "input_pos": torch.arange(length, dtype=torch.int32),
            "kv_cache": cache,
        }

    prefill = min(PREFILL_LENGTH, context)
    litert_torch = _litert_torch()
    with _quiet():
        converter = litert_torch.signature("prefill", steps, sample_kwargs=inputs(prefill))
        converter = converter.signature("decode", steps, sample_kwargs=inputs(1))
        # litert-torch's lightweight conversion hands the weights to the converter lazily instead of
        # copying them into the graph first: the default model's conversion peaked 1.0 GB above the
        # loaded model instead of 2.0 GB, in 54 s instead of 58 s, with logits bit-identical in prefill
        # and decode (its constant folding runs in the LiteRT runtime instead). At 1.24B parameters the
        # default conversion's ~9 GB above the model was the step the kernel killed on a 23 GB machine.
        edge_model = converter.convert(lightweight_conversion=True)
        edge_model.export(str(path))
    return {"max_context": context, "prefill_length": prefill}


def encoder_lengths(max_length: int) -> list[int]:
    return sorted({length for length in ENCODER_LENGTHS if length < max_length} | {max_length})


def convert_encoder(model: Any, task: str, path: Path) -> dict[str, Any]:
    """Convert an encoder (edgelm.encoder_graph) to a float .tflite with one `encode_<L>`
    signature per padded length L, batch 1. (litert-torch cannot convert the graph with a
    symbolic length: the position ids' arange needs a concrete end.)"""
    import torch

    from edgelm.encoder_graph import EncoderGraph

    graph = EncoderGraph(model, task).eval()
    lengths = encoder_lengths(graph.signature.max_length)
    converter: Any = _litert_torch()
    with _quiet():
        for length in lengths:
            ids = torch.ones((1, length), dtype=torch.long)
            converter = converter.signature(f"{ENCODER_PREFIX}{length}", graph, (ids, torch.ones_like(ids)))
        converter.convert(lightweight_conversion=True).export(str(path))  # see convert_decoder
    return {"max_context": lengths[-1], "lengths": lengths}


def quantize_flatbuffer(float_path: Path, quant: str, path: Path) -> dict[str, Any]:
    """Apply the ai-edge-quantizer recipe for `quant` to the float model; return what was done.
    int4: the layers exporters/tflite_int4.py put on a 4-bit grid (the inner Linear of each
    BlockBiasCorrected, found by its module name in the op's scope) are stored blockwise int4
    as they are (dequantized weight recovery), their float offsets stay float, every other
    weight is int8 per channel as in the int8 recipe."""
    mode, bits, granularity = QUANT_RECIPES[quant]
    quiet_noisy_imports()
    with _quiet():
        from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

        from edgelm.exporters.tflite_int4 import CORRECTION, INNER

        qt = quantizer.Quantizer(str(float_path))
        every_op, fully_connected = qtyping.TFLOperationName.ALL_SUPPORTED, qtyping.TFLOperationName.FULLY_CONNECTED
        if mode == "float_casting":
            qt.add_weight_only_config(regex=".*", operation_name=every_op, num_bits=16, algorithm_key="float_casting")
        else:
            qt.add_dynamic_config(
                regex=".*",
                operation_name=every_op,
                num_bits=8,
                granularity=qtyping.QuantGranularity.CHANNELWISE,
            )
        if quant == "int4":  # later configs win where their scope matches
            names = algorithm_manager.AlgorithmName
            qt.add_dynamic_config(
                regex=f"Linear_{INNER}",
                operation_name=fully_connected,
                num_bits=bits,
                granularity=qtyping.QuantGranularity[granularity],
                algorithm_key=names.DEQUANTIZED_WEIGHT_RECOVERY,
            )
            qt.update_quantization_recipe(
                regex=f"Linear_{CORRECTION}", operation_name=fully_connected, algorithm_key=names.NO_QUANTIZE
            )
        qt.quantize().export_model(str(path), overwrite=True)
    described = {
        "fp16": {"weights": "float16", "compute": "float32"},
        "int8": {"weights": "int8 per channel", "activations": "int8 dynamic (quantized on the fly)"},
        "int4": {
            "weights": "int4 blockwise (32) with a float offset per block (block-bias correction) for the "
            "transformer layers; output projection and embedding int8 per channel",
            "activations": "int8 dynamic (quantized on the fly)",
        },
    }
    return {**described[quant], "quantizer": "ai-edge-quantizer"}


def _flatbuffer(model: Any, task: str, quant: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The .tflite at `path`, converted in float (litert-torch) and then, unless fp32, quantized
    (ai-edge-quantizer): (the converted layout, the quantization recipe)."""
    with tempfile.TemporaryDirectory(prefix="edgelm-tflite-") as scratch:
        float_path = path if quant == "fp32" else Path(scratch) / "float.tflite"
        with phase("Converting to a float .tflite (litert-torch)"):
            if task == "text-generation":
                layout = convert_decoder(model, float_path)
            else:
                layout = convert_encoder(model, task, float_path)
        if quant == "fp32":
            return layout, {"weights": "float32"}
        with phase(f"Quantizing the flatbuffer ({quant}, ai-edge-quantizer)"):
            return layout, quantize_flatbuffer(float_path, quant, path)


def fits_a_fused_copy(model: Any) -> bool:
    """Whether the memory available now holds the fused Linears beside the caller's weights and the
    conversion after them: the fused ones are new tensors (about 0.8x the weights of a Llama-like
    decoder) and litert-torch's conversion peaked at 3.1x the weights (edgelm.background's figures)."""
    return memory_holds(model, FUSED_COPY_FACTOR)


def fused_copy(model: Any) -> Any:
    """A copy of `model` (sharing the caller's weights) whose decoder layers read each input with one
    Linear: q|k|v and gate|up (edgelm.fusion). Each FULLY_CONNECTED of a dynamic-range file quantizes
    its input on the fly, so three projections of one input quantized it three times; fused, a decode
    step of the default model runs 90 fewer FULLY_CONNECTED and 150 more (cheap) SLICEs that split
    their outputs. int4 keeps the parts: its grids and GPTQ statistics are found by the parts' names."""
    from edgelm.fusion import fuse_layer

    model = copy_sharing_weights(model)
    for layer in model.model.layers:
        fuse_layer(layer)
    return model


def _litert_torch() -> Any:
    quiet_noisy_imports()
    try:
        with _quiet():
            import litert_torch
    except ImportError as err:
        raise UnsupportedError(f"the TFLite exporter needs litert-torch ({err}); install `edgelm[tflite]`") from err
    return litert_torch


@contextlib.contextmanager
def _quiet() -> Any:
    """The converter and quantizer print progress, TF/absl log lines (some from C++, straight
    to fd 2) and warnings about internals a user cannot act on; an error still propagates.
    EDGELM_LITERT_LOG=1 keeps the native lines."""
    previous = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        with (
            quiet_library_output(("", "torch", "absl", "tensorflow"), stderr=True),
            quiet_native_stderr(LOG_VARIABLE),
        ):
            yield
    finally:
        if previous is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = previous


class TFLiteExporter(Exporter):
    format = "tflite"
    runtime = "litert"
    quants = tuple(FILE_NAMES)
    tasks = ("text-generation", "feature-extraction", "text-classification")
    requires = ("torch", "transformers", "litert_torch", "ai_edge_litert", "ai_edge_quantizer")
    exports_in_background = True  # litert-torch's conversion is minutes of single-threaded Python (edgelm.background)
    gptq = ("int4",)  # calibrated attempts pick 4-bit codes by GPTQ (the export's hessians)

    def export(
        self, model: Any, source: SourceModel, bundle_dir: Path, quant: str, hessians: dict[str, Any] | None = None
    ) -> ExportedArtifact:
        folder = bundle_dir / "tflite"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / FILE_NAMES[quant]
        encoder = source.task != "text-generation"
        grid: dict[str, Any] = {}
        if quant == "int4":  # the layers on their 4-bit grid before conversion (the caller's model is kept)
            from edgelm.exporters.tflite_int4 import to_block_grid

            model = copy_sharing_weights(model)  # to_block_grid assigns new weights, never writes into one
            with phase("Putting the layers on 4-bit grids" + (" (GPTQ)" if hessians else "")):
                grid = {"block_grid": to_block_grid(model, hessians)}
        elif not encoder and lookup_architecture(model.config.model_type, "tflite").separate_projections:
            fused = fits_a_fused_copy(model)
            model = fused_copy(model) if fused else model
            grid = {"fused_projections": "q|k|v and gate|up, one FULLY_CONNECTED each" if fused else FUSION_SKIPPED}
        layout, recipe = _flatbuffer(model, source.task, quant, path)
        recipe.update(grid)
        if encoder:
            from edgelm.encoder_graph import encoder_signature

            return ExportedArtifact(
                path=path,
                quant=quant,
                built_by="edgelm.encoder_graph → litert-torch" + ("" if quant == "fp32" else " → ai-edge-quantizer"),
                signature={
                    **encoder_signature(model.config, source.task).to_dict(),
                    "signatures": [f"{ENCODER_PREFIX}{length}" for length in layout["lengths"]],
                    "batch": "1 per call (the runtime runs a batch row by row, each padded to the "
                    "shortest signature that fits)",
                    "quantization": {**recipe, **layout},
                },
            )
        signature = decoder_signature(model.config)
        return ExportedArtifact(
            path=path,
            quant=quant,
            built_by="edgelm.graph (in-place cache, LiteRT-LM's names) → litert-torch"
            + ("" if quant == "fp32" else " → ai-edge-quantizer"),
            signature={
                "signatures": {"prefill": f"tokens[1,{layout['prefill_length']}]", "decode": "tokens[1,1]"},
                "inputs": [
                    "tokens[1,n] int32",
                    "input_pos[n] int32",
                    "kv_cache_k_i[1,kv_heads,max_context,head_dim] float32",
                    "kv_cache_v_i[1,kv_heads,head_dim,max_context] float32 (transposed, as litert-torch's "
                    "transpose_kv_cache)",
                ],
                "outputs": ["logits[1,n,vocab] float32", "kv_cache_{k,v}_i (the updated cache, same shape)"],
                "kv_cache": f"{layout['max_context']} positions, in and out under one name: the runtime binds "
                "each output to its input's buffer (LiteRT-LM's convention)",
                "num_layers": signature.num_layers,
                "max_context": layout["max_context"],
                "prefill_length": layout["prefill_length"],
                "quantization": {**recipe, **layout},
            },
        )


EXPORTER = TFLiteExporter()
