"""Fewer, wider MatMuls in an exported ONNX graph: one per input instead of one per projection.

Llama, Qwen2 and Gemma3 checkpoints keep q/k/v and gate/up as separate Linears, so the exported
decoder has seven weight MatMuls per layer where onnxruntime-genai's model builder has five: a
decode step is hundreds of small kernels, each a dispatch and its own pass over the activations
(and after quantization, its own 8-bit quantization of the same input). Two rewrites, on the fp32
graph before it is quantized:

- q|k|v packed into GroupQueryAttention. Where the node's query, key and value are each a MatMul
  of one input, reshaped only (to heads and back: a reshape moves no data, and the node takes
  [batch, positions, heads * head_dim] at both ends), the three weights become one MatMul whose
  output the node reads as packed QKV (its key and value left empty), as the builder's graphs do.
  Six Reshapes per layer go with them.
- Any other MatMuls reading one input (gate|up; an encoder's q/k/v, whose bias Adds stay) become
  one MatMul and a Split into the original outputs.

Each fused weight is its parts side by side along N, so every column (an output) is computed from
the same row of inputs as before: a weight-only quantizer's blocks run along K and never mix
outputs, and the parts' shared input means their GPTQ statistics are one (the first part's).
`fuse_projections` returns which parts each fused weight holds; `FusedWeights` gives the fp32
weights under the fused names, concatenated only when read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

ATTENTION = "GroupQueryAttention"


def fuse_projections(model: Any) -> dict[str, list[str]]:
    """Rewrite `model` in place (q|k|v packed into GroupQueryAttention, other MatMuls of one input
    concatenated); return {fused weight name: its parts' weight names, in order}."""
    graph = model.graph
    fused = _pack_attention_inputs(graph)
    fused |= _concatenate_siblings(graph)
    _drop_unused(graph)
    return fused


class FusedWeights(Mapping):
    """fp32 MatMul weights by initializer name, where a fused weight is its parts' arrays
    concatenated along N when read (all at once, at 1B parameters, they were gigabytes)."""

    def __init__(self, weights: Mapping[str, np.ndarray], parts: dict[str, list[str]]) -> None:
        self.weights = weights
        self.parts = {name: names for name, names in parts.items() if all(n in weights for n in names)}
        self.fused_away = {part for names in self.parts.values() for part in names}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.parts:
            return np.concatenate([self.weights[part] for part in self.parts[name]], axis=1)
        if name in self.fused_away:
            raise KeyError(name)
        return self.weights[name]

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in self.weights if name not in self.fused_away)
        yield from self.parts

    def __len__(self) -> int:
        return sum(1 for _ in self)


def fused_modules(modules: dict[str, str], parts: dict[str, list[str]]) -> dict[str, str]:
    """`modules` (weight name → the torch Linear it came from) with each fused weight under its
    first part's Linear: all parts read one input, so that Linear's input statistics are theirs."""
    found = {name: modules[names[0]] for name, names in parts.items() if names[0] in modules}
    return modules | found


def _weight(matrices: dict[str, Any], node: Any) -> Any | None:
    """The 2-D initializer a MatMul multiplies by, or None (a MatMul of two activations)."""
    return matrices.get(node.input[1]) if node.op_type == "MatMul" else None


def _matrices(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer if len(t.dims) == 2}


def _consumers(graph: Any) -> dict[str, list[Any]]:
    readers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return readers


def _concatenated_matmul(graph: Any, matmuls: list[Any], output: str) -> tuple[Any, str, list[str], list[int]]:
    """One MatMul of the parts' shared input by their weights side by side (a new initializer that
    replaces theirs), writing `output`; returns (the node, the fused weight's name, the parts'
    weight names, each part's width)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    names = [node.input[1] for node in matmuls]
    arrays = [numpy_helper.to_array(inits[name]) for name in names]
    fused_name = f"{names[0]}_fused"
    graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), fused_name))
    for name in names:
        graph.initializer.remove(inits[name])
    node = helper.make_node("MatMul", [matmuls[0].input[0], fused_name], [output], name=f"{matmuls[0].name}_fused")
    node.metadata_props.extend(matmuls[0].metadata_props)  # the scope edgelm reads a layer number from
    return node, fused_name, names, [a.shape[1] for a in arrays]


def _matmul_behind_reshapes(
    matrices: dict[str, Any], name: str, producers: dict[str, Any], readers: dict[str, list[Any]]
) -> tuple[Any, list[Any]] | None:
    """(the weight MatMul `name` is a reshape of, the Reshapes between) when each step's only reader
    is the next; else None."""
    chain = []
    node = producers.get(name)
    while node is not None and node.op_type == "Reshape" and len(readers[node.output[0]]) == 1:
        chain.append(node)
        node = producers.get(node.input[0])
    if node is None or _weight(matrices, node) is None or len(readers[node.output[0]]) != 1:
        return None
    return node, chain


def _pack_attention_inputs(graph: Any) -> dict[str, list[str]]:
    producers = {output: node for node in graph.node for output in node.output}
    readers, matrices = _consumers(graph), _matrices(graph)
    fused: dict[str, list[str]] = {}
    for attention in [node for node in graph.node if node.op_type == ATTENTION]:
        found = [_matmul_behind_reshapes(matrices, name, producers, readers) for name in attention.input[:3]]
        if any(f is None for f in found) or len({f[0].input[0] for f in found}) != 1:
            continue
        matmuls = [f[0] for f in found]
        packed = f"{attention.name or attention.output[0]}_packed_qkv"
        node, name, parts, _ = _concatenated_matmul(graph, matmuls, packed)
        graph.node.insert(list(graph.node).index(matmuls[0]), node)
        for old in matmuls + [step for f in found for step in f[1]]:
            graph.node.remove(old)
        attention.input[0], attention.input[1], attention.input[2] = packed, "", ""
        fused[name] = parts
    return fused


def _concatenate_siblings(graph: Any) -> dict[str, list[str]]:
    from onnx import helper, numpy_helper

    matrices = _matrices(graph)
    by_input: dict[tuple, list[Any]] = defaultdict(list)
    for node in graph.node:
        weight = _weight(matrices, node)
        if weight is not None:
            by_input[(node.input[0], weight.dims[0], weight.data_type)].append(node)
    fused: dict[str, list[str]] = {}
    for matmuls in by_input.values():
        if len(matmuls) < 2:
            continue
        joined = f"{matmuls[0].output[0]}_joined"
        node, name, parts, widths = _concatenated_matmul(graph, matmuls, joined)
        sizes = f"{name}_split"
        graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), sizes))
        split = helper.make_node("Split", [joined, sizes], [m.output[0] for m in matmuls], name=sizes, axis=-1)
        position = list(graph.node).index(matmuls[0])
        for old in matmuls:
            graph.node.remove(old)
        graph.node.insert(position, split)
        graph.node.insert(position, node)
        fused[name] = parts
    return fused


def _drop_unused(graph: Any) -> None:
    """Remove nodes none of whose outputs is read (the reshapes' shape computations), then
    initializers nothing reads."""
    wanted = {output.name for output in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | wanted
        dead = [node for node in graph.node if not any(output in read for output in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | wanted
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)
