"""ExecuTorch exporter: the shared decoder graph with a static KV cache → torch.export →
torchao quantization → to_edge_transform_and_lower (XNNPACK) → .pte.

The graph is edgelm.graph's, in its static-cache layout: the cache lives in mutable
buffers inside the program and `input_pos` says where new tokens go, so a decode step
passes one token id and one position across the boundary and gets logits back. With
float32 activations (every recipe but fp16) the cache writes and attention go through
ExecuTorch's llama custom ops (update_cache, custom_sdpa), which read grouped heads in
place and stop at the last written position; the runtime registers their kernels.

Quant mapping (the README's recipes), through torchao configs that the XNNPACK partitioner lowers:
  fp32 → float; fp16 → float16 weights, activations and KV cache;
  int8 → 8-bit dynamic activations, 8-bit per-channel weights (8da8w);
  int4 → 8-bit dynamic activations, 4-bit weights in groups of 32 (8da4w) for the
         transformer layers, each block centred and its offset added back by a block-bias
         correction (see quantize_with_block_bias; plain symmetric round-to-nearest 8da4w
         loses 42% perplexity on SmolLM2, this 1.5%, measured in eager mode); the output projection
         stays 8da8w (it decides every token; llama.cpp's Q4_K_M keeps it at 6 bits for the
         same reason). A calibrated attempt also gets each layer's input statistics on the
         calibration text: per layer, GPTQ's codes on a searched grid replace round-to-nearest
         when they err less on those inputs, and the block offsets are fitted to them
         (_gptq_on_block_grid; mild off-grid twin of SmolLM2: ppl ratio 1.075 → 1.043 with
         act-order → 1.040 with fitted offsets).
int8 and int4 first fuse each layer's q/k/v and gate/up into one Linear each where the checkpoint
keeps them apart (edgelm.fusion): fewer nodes for the lowering, and one activation
quantization per input at run time.
int8 and int4 also store the token embedding as int8 per row: the lookup is not delegated
(XNNPACK has no gather), so it runs as ExecuTorch's quantized `embedding_byte` kernel, and
the 113 MB fp32 table of SmolLM2 becomes 28 MB.
The program carries its own facts as constant methods (max context, vocab size, quant),
which the runtime reads instead of hard-coding them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from edgelm.architectures import lookup_architecture
from edgelm.errors import UnsupportedError
from edgelm.exporter import ExportedArtifact, Exporter
from edgelm.exporters.executorch_partitions import partitions_sorted_once
from edgelm.graph import decoder_signature
from edgelm.model import SourceModel, copy_sharing_weights, quiet_noisy_imports
from edgelm.native_log import quiet_library_output
from edgelm.steps import phase

STATIC_CONTEXT = 1024  # cache positions allocated in the program (bounded by the model's own maximum)
FILE_NAMES = {"fp32": "model.pte", "fp16": "model_fp16.pte", "int8": "model_8da8w.pte", "int4": "model_8da4w.pte"}
GROUP_SIZE = 32
# --delegate -> (partitioner module, class, the runtime backend that runs it)
DELEGATE_PARTITIONERS = {
    "xnnpack": ("executorch.backends.xnnpack.partition.xnnpack_partitioner", "XnnpackPartitioner", "XnnpackBackend"),
    "vulkan": ("executorch.backends.vulkan.partitioner.vulkan_partitioner", "VulkanPartitioner", "VulkanBackend"),
    "qnn": ("executorch.backends.qualcomm.partition.qnn_partitioner", "QnnPartitioner", "QnnBackend"),
    "coreml": ("executorch.backends.apple.coreml.partition", "CoreMLPartitioner", "CoreMLBackend"),
    "mps": ("executorch.backends.apple.mps.partition", "MPSPartitioner", "MPSBackend"),
}
DEFAULT_DELEGATE = "xnnpack"


def check_delegate(name: str) -> str:
    """The delegate's name if this install can both lower to it and run the result (edgelm
    measures every artifact's parity); otherwise an UnsupportedError that says which half is
    missing."""
    if name not in DELEGATE_PARTITIONERS:
        raise UnsupportedError(f"unknown ExecuTorch delegate {name!r}; known: {', '.join(DELEGATE_PARTITIONERS)}")
    module, cls, backend = DELEGATE_PARTITIONERS[name]
    quiet_noisy_imports()
    try:
        getattr(importlib.import_module(module), cls)
    except Exception as err:  # an ImportError, or a backend SDK that fails at import
        raise UnsupportedError(
            f"the installed executorch cannot lower to {name} ({type(err).__name__}: {err}); "
            f"delegates it can lower and run here: {', '.join(runnable_delegates())}"
        ) from err
    from edgelm.runtimes.executorch import registered_backends

    if backend not in registered_backends():
        raise UnsupportedError(
            f"executorch here can lower to {name}, but its runtime has no {backend}, so edgelm could not measure the "
            f"artifact's parity; export where the runtime has it (e.g. on the device), or use: "
            f"{', '.join(runnable_delegates())}"
        )
    if name != DEFAULT_DELEGATE:
        raise UnsupportedError(
            f"lowering to {name} needs its vendor SDK's compile settings, which this edgelm does not "
            f"configure yet; use --delegate {DEFAULT_DELEGATE}"
        )
    return name


def runnable_delegates() -> list[str]:
    from edgelm.runtimes.executorch import registered_backends

    present = registered_backends()
    return [
        name
        for name, (_, _, backend) in DELEGATE_PARTITIONERS.items()
        if backend in present and name == DEFAULT_DELEGATE
    ]


def _quantize(
    graph: Any,
    quant: str,
    hessians: dict[str, Any] | None = None,
    names: dict[int, str] | None = None,
    fuse: bool = False,
) -> dict[str, Any]:
    """Apply the torchao recipe for `quant` to `graph` in place; return what was done.
    `hessians` (int4, calibrated attempts): per source Linear name, its inputs' statistics on the
    calibration text (edgelm.gptq); `names` maps id(module) → that name. `fuse`: fuse each decoder
    layer's q/k/v and gate/up first (edgelm.fusion; the graph must be a DecoderGraph)."""
    if quant == "fp32":
        return {"weights": "float32"}
    if quant == "fp16":  # the model was cast before the graph was built (see _working_copy)
        return {"weights": "float16", "activations": "float16", "kv_cache": "float16"}
    import torch

    quiet_noisy_imports()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    per_channel_8bit = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    embeddings = quantize_embeddings(graph)
    names = dict(names or {})
    targets = _layer_linears(graph, names, fuse)
    fused = {"fused_projections": "q|k|v and gate|up, one matmul each"} if fuse else {}
    has_head = isinstance(getattr(graph, "lm_head", None), torch.nn.Linear)
    head = {"output_projection": "int8 per channel"} if has_head else {}
    quantize_(graph, per_channel_8bit, filter_fn=lambda module, fqn: fqn == "lm_head")
    if quant == "int8":
        for _, module in targets:
            quantize_(graph, per_channel_8bit, filter_fn=lambda candidate, _, target=module: candidate is target)
        described = {"activations": "int8 dynamic per token", "weights": "int8 per channel"}
        return {**described, **head, "embedding": embeddings, **fused}
    corrected, recoded = quantize_with_block_bias(
        graph,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4,
            weight_granularity=PerGroup(GROUP_SIZE),
            weight_mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR,
        ),
        targets,
        hessians=hessians,
        names=names,
    )
    return {
        "activations": "int8 dynamic per token",
        "weights": f"int4 symmetric around each block's midpoint, groups of {GROUP_SIZE}; the midpoint is added "
        "back by the block-bias correction (Q4_1-like)",
        "block_bias_correction": corrected,
        **head,
        "embedding": embeddings,
        **fused,
        **({"gptq_layers": recoded} if hessians is not None else {}),
    }


def _layer_linears(graph: Any, names: dict[int, str], fuse: bool) -> Iterator[tuple[str, Any]]:
    """Every Linear of `graph` but the output head, by module name, in order. With `fuse`, each
    decoder layer's projections are fused (edgelm.fusion) only when its turn comes, so one
    layer's concatenated float weights exist at a time (each is replaced as it is quantized);
    a fused Linear is entered in `names` under a part's name, whose input statistics it shares."""
    from edgelm.fusion import fuse_layer
    from edgelm.model import linears_but_the_head

    def linears(root: Any, prefix: str) -> list[tuple[str, Any]]:
        return [(f"{prefix}{name}", module) for name, module in linears_but_the_head(root)]

    if not fuse:
        yield from linears(graph, "")
        return
    for index, layer in enumerate(graph.body.layers):
        for fused, part in fuse_layer(layer).items():
            names[id(fused)] = names.get(id(part), "")
        yield from linears(layer, f"body.layers.{index}.")


def quantize_embeddings(graph: Any) -> str:
    """Store every Embedding table as int8 per row (weight-only); the lowering turns the
    dequantize + lookup into quantized_decomposed::embedding_byte (the quant fusion
    switched on in _backend_config), which the runtime runs from its quantized kernel library."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    def is_embedding(module: Any, fqn: str = "") -> bool:
        return isinstance(module, torch.nn.Embedding)

    for module in graph.modules():
        if is_embedding(module):
            # padding_idx only shapes gradients, but it is an extra argument of the traced
            # lookup that the fusion pattern, embedding(weight, indices), does not match
            module.padding_idx = None
    quantize_(graph, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), filter_fn=is_embedding)
    return "int8 per row"


def quantize_with_block_bias(
    graph: Any,
    config: Any,
    targets: Iterable[tuple[str, Any]],
    hessians: dict[str, Any] | None = None,
    names: dict[int, str] | None = None,
) -> tuple[int, int]:
    """4-bit weights with a float offset per block, built from symmetric int4 (which XNNPACK's
    8da4w kernels run; their asymmetric form did not lower correctly here).

    `targets`: the Linears to quantize, (name in `graph`, module), taken one at a time.
    Each block of GROUP_SIZE weights is first centred: minus c = min + 8·(max − min)/15, so
    it spans [−8d, 7d] with d = (max − min)/15, which `config` (symmetric, no clipping error)
    quantizes with scale d; a block already on a 4-bit grid (as in a Q4_1 GGUF) is then
    exact. The offset — and the mean of whatever rounding left — comes back as one small
    float Linear: per output row and block, the mean residual (W − dequantized W) times the
    sum of the block's inputs (1/GROUP_SIZE of the multiply-adds; the same correction as the
    ONNX int4 recipe, exporters/onnx_block_bias.py).

    With `hessians` (a layer's input statistics on the calibration text, found through
    `names`: id(module) → source name), a layer may take GPTQ's codes instead (see
    _gptq_on_block_grid). Returns (layers corrected, layers that took GPTQ's codes).
    """
    import torch
    from torchao.quantization import quantize_

    from edgelm.exporters.block_bias import BlockBiasCorrected, replace_module

    corrected = recoded = 0
    for name, module in targets:  # one layer at a time: only its centred copy and residual are extra memory
        # the weight is replaced below, never written into, so the original stays the caller's tensor
        original = module.weight.detach()
        blocks = original.unflatten(-1, (-1, GROUP_SIZE))
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        module.weight = torch.nn.Parameter((blocks - (low + 8 * (high - low) / 15)).flatten(-2), requires_grad=False)
        quantize_(graph, config, filter_fn=lambda candidate, _, target=module: candidate is target)
        residual = original - module.weight.dequantize().to(original.dtype)
        block_mean = residual.unflatten(-1, (-1, GROUP_SIZE)).mean(-1)  # [out, in / GROUP_SIZE]
        del residual
        inputs = (hessians or {}).get((names or {}).get(id(module)))
        if inputs is not None:
            block_mean, took_gptq = _gptq_on_block_grid(module.weight, original, block_mean, inputs)
            recoded += took_gptq
        replace_module(graph, name, BlockBiasCorrected(module, block_mean))
        corrected += 1
    return corrected, recoded


def _gptq_on_block_grid(quantized: Any, original: Any, block_mean: Any, inputs: Any) -> tuple[Any, bool]:
    """The layer's codes and per-block offsets chosen on its calibration inputs: GPTQ's codes
    (written into torchao's int4 tensor) or round-to-nearest's, whichever errs less, each with
    its offsets fitted to those inputs (block_bias.fitted_offsets; a weight already on a
    4-bit grid gets its exact offsets back). Returns (offsets, took GPTQ's codes).

    Any asymmetric 4-bit grid w = s·(q − z), q ∈ 0..15, is this recipe's symmetric int4
    k = q − 8 with scale s plus a float offset per block, which the block-bias Linear adds.
    So the grid is edgelm.gptq's searched one (each block's range chosen by error weighted by
    the inputs' energy), GPTQ picks the codes on it, and the error compared is
    tr((W − Ŵ) H (W − Ŵ)ᵀ), the output error on the calibration inputs.
    """
    import torch

    from edgelm.exporters.block_bias import best_fitted, spread
    from edgelm.gptq import gptq_codes, searched_grid

    h = inputs.hessian()
    scale, zero = searched_grid(original, torch.diag(h), GROUP_SIZE)
    codes = gptq_codes(original, inputs, scale, zero, GROUP_SIZE, hessian=h)
    rtn = (quantized.dequantize().to(original.dtype), block_mean)
    choice, offsets = best_fitted(original, h, [rtn, ((codes - 8) * spread(scale), scale * (8 - zero))])
    if choice == 0:
        return offsets.to(block_mean.dtype), False
    quantized.qdata.copy_((codes - 8).to(quantized.qdata.dtype))
    quantized.scale.copy_(scale.to(quantized.scale.dtype))
    quantized.zero_point.zero_()
    return offsets.to(block_mean.dtype), True


def export_pte(
    model: Any, quant: str, path: Path, runner: dict[str, Any] | None = None, hessians: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Export `model` (not modified) as an XNNPACK-delegated .pte at `path`; return the recipe.
    `runner`: extra constant methods (the LLM runner's, edgelm.vendors.executorch_runner);
    `hessians`: int4 layers' input statistics for GPTQ (edgelm.gptq), by module name."""
    import torch

    quiet_noisy_imports()
    from edgelm.graph import build_decoder_graph

    signature = decoder_signature(model.config)
    context = min(STATIC_CONTEXT, signature.max_context)
    work = _working_copy(model, quant)
    # ExecuTorch's custom cache/attention kernels take float32 (fp16 keeps the plain graph)
    custom_ops = quant != "fp16"
    if custom_ops:  # registers torch.ops.llama.* for tracing
        importlib.import_module("executorch.extension.llm.custom_ops.custom_ops")
    # fp32 keeps a tied embedding table once; the quantized recipes need the head as a Linear
    graph = build_decoder_graph(work, static_context=context, separate_head=quant != "fp32", executorch_ops=custom_ops)
    for parameter in graph.parameters():
        parameter.requires_grad_(False)  # in-place cache writes on tensors that need grad cannot be exported
    with phase(f"Quantizing the layers ({quant}{', GPTQ' if hessians and quant == 'int4' else ''})"):
        recipe = _quantize(
            graph,
            quant,
            hessians if quant == "int4" else None,
            {id(module): name for name, module in work.named_modules()},
            fuse=lookup_architecture(model.config.model_type, "executorch").separate_projections,
        )
    n = torch.export.Dim("n", min=1, max=context)
    ids, pos = torch.zeros((1, 2), dtype=torch.long), torch.zeros((1,), dtype=torch.long)
    constants = {
        "get_max_context": context,
        "get_vocab_size": signature.vocab_size,
        "get_num_layers": signature.num_layers,
        "is_encoder": False,
        **(runner or {}),
    }
    path.write_bytes(_lowered(graph, (ids, pos), ({1: n}, (None,)), constants))
    return {
        **recipe,
        "max_context": context,
        "attention": "executorch llama custom ops (update_cache, custom_sdpa)" if custom_ops else "aten ops",
    }


def _lowered(graph: Any, example: tuple[Any, ...], dynamic_shapes: tuple[Any, ...], constants: dict[str, Any]) -> bytes:
    """The .pte bytes of `graph`: torch.export → to_edge_transform_and_lower (XNNPACK) →
    to_executorch, each a phase of the export step (the lowering is the long one)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with quiet_library_output(("torch",)):  # torch.export and the lowering warn about internals
        with phase("Capturing the graph (torch.export)"):
            exported = torch.export.export(graph, example, dynamic_shapes=dynamic_shapes, strict=False)
        with phase("Lowering to XNNPACK (to_edge_transform_and_lower)"), partitions_sorted_once():
            edge = to_edge_transform_and_lower(
                exported, partitioner=[XnnpackPartitioner()], compile_config=_edge_config(), constant_methods=constants
            )
        del exported
        with phase("Writing the program (to_executorch)"):
            return edge.to_executorch(_backend_config()).buffer


def _working_copy(model: Any, quant: str) -> Any:
    """The model to lower: the caller's own for fp32; otherwise a copy that shares its weights
    (edgelm.model.copy_sharing_weights): quantization assigns each Linear a new weight and the
    fp16 cast gives the copy's Parameters new data, so the caller's model — the parity
    reference — is left as it was."""
    if quant == "fp32":
        return model
    import torch

    work = copy_sharing_weights(model)
    return work.to(torch.float16) if quant == "fp16" else work


def export_encoder_pte(model: Any, task: str, quant: str, path: Path) -> dict[str, Any]:
    """Export an encoder (edgelm.encoder_graph) with dynamic batch and length as a .pte."""
    import torch

    quiet_noisy_imports()
    from edgelm.encoder_graph import EncoderGraph, example_encoder_inputs

    graph = EncoderGraph(_working_copy(model, quant), task).eval()
    for parameter in graph.parameters():
        parameter.requires_grad_(False)
    with phase(f"Quantizing the layers ({quant})"):
        recipe = _quantize(graph, quant)
    batch = torch.export.Dim("batch", min=1, max=256)
    n = torch.export.Dim("n", min=1, max=graph.signature.max_length)
    constants = {"get_max_context": graph.signature.max_length, "is_encoder": True}
    path.write_bytes(_lowered(graph, example_encoder_inputs(), ({0: batch, 1: n}, {0: batch, 1: n}), constants))
    return {**recipe, "max_context": graph.signature.max_length}


def _edge_config() -> Any:
    """The edge settings ExecuTorch's own LLM export uses (extension/llm/export/builder.py): no IR
    re-verification after each pass and no dim-order ops (contiguous tensors only) — about 10%
    of the lowering's time on the default model's shapes, for the same kernels."""
    from executorch.exir import EdgeCompileConfig

    return EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True)


def _backend_config() -> Any:
    from executorch.exir import ExecutorchBackendConfig

    # fuse torchao's dequantize + embedding into the runtime's quantized embedding kernel
    return ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True)


class ExecuTorchExporter(Exporter):
    format = "executorch"
    runtime = "executorch"
    quants = tuple(FILE_NAMES)
    tasks = ("text-generation", "feature-extraction", "text-classification")
    requires = ("torch", "transformers", "executorch", "torchao")
    exports_in_background = True  # the XNNPACK lowering is minutes of single-threaded Python (edgelm.background)
    # the export's longest step, which it ends up waiting for: not below the export's own work
    # (at nice 10 behind the export's two threads, its torch.export took 56 s instead of 10 s
    # alone), and ahead of TFLite's worker for spare CPU
    background_nice = 0
    gptq = ("int4",)  # calibrated attempts pick 4-bit codes by GPTQ (the export's hessians)

    own_options: ClassVar[dict[str, str]] = {"delegate": "--delegate"}

    def check_options(self, options: Any) -> None:
        if options.delegate:
            check_delegate(options.delegate)

    def export(
        self, model: Any, source: SourceModel, bundle_dir: Path, quant: str, hessians: dict[str, Any] | None = None
    ) -> ExportedArtifact:
        folder = bundle_dir / "executorch"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / FILE_NAMES[quant]
        built_by = "→ torch.export → torchao → to_edge_transform_and_lower(XnnpackPartitioner)"
        if source.task != "text-generation":
            from edgelm.encoder_graph import encoder_signature

            recipe = export_encoder_pte(model, source.task, quant, path)
            signature = encoder_signature(model.config, source.task).to_dict()
            return ExportedArtifact(
                path=path,
                quant=quant,
                built_by=f"edgelm.encoder_graph {built_by}",
                signature={
                    **signature,
                    "delegates": [DEFAULT_DELEGATE],
                    "quantization": recipe,
                    "methods": ["forward", "get_max_context", "is_encoder"],
                },
            )
        from edgelm.vendors import generation_facts
        from edgelm.vendors.executorch_runner import runner_methods

        signature = decoder_signature(model.config)
        facts = generation_facts(bundle_dir / "tokenizer", model.config)
        runner = runner_methods(min(STATIC_CONTEXT, signature.max_context), facts.bos_id, facts.eos_ids)
        recipe = export_pte(model, quant, path, runner, hessians)
        return ExportedArtifact(
            path=path,
            quant=quant,
            built_by=f"edgelm.graph (static cache) {built_by}",
            signature={
                "inputs": ["input_ids[1,n] int64", "input_pos[1] int64"],
                "outputs": ["logits[1,n,vocab] float32"],
                "kv_cache": f"static, {recipe['max_context']} positions in mutable buffers inside the program",
                "methods": ["forward", "get_max_context", "get_vocab_size", "get_num_layers", "is_encoder", *runner],
                "delegates": [DEFAULT_DELEGATE],
                "num_layers": signature.num_layers,
                "max_context": recipe["max_context"],
                "quantization": recipe,
            },
        )


EXPORTER = ExecuTorchExporter()
