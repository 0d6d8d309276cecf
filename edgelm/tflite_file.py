"""Read a .tflite flatbuffer defensively, before LiteRT's native loader sees it.

Python's flatbuffers accessors are bounds-checked by the interpreter (a read past the end
raises instead of reading foreign memory), so walking every table edgelm relies on —
subgraphs, tensors and their shapes, buffers and the bytes they point at, operator codes,
signatures — is a structural verification: a truncated or foreign file becomes an
InvalidModelError here. The walk also yields what `edgelm inspect` shows.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidModelError

TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8
MAX_RANK = 16  # LiteRT kernels take at most 6 dimensions


@dataclass
class TFLiteSummary:
    bytes: int
    version: int
    signatures: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # name -> (inputs, outputs)
    tensor_types: Counter = field(default_factory=Counter)  # constant (weight) tensors by type
    weight_bytes: Counter = field(default_factory=Counter)  # their bytes by type
    operators: Counter = field(default_factory=Counter)  # op name -> count over all subgraphs
    signature_operators: dict[str, int] = field(default_factory=dict)  # name -> ops one call runs (its subgraph's)


def _names(enum_class: type) -> dict[int, str]:
    return {value: name for name, value in vars(enum_class).items() if not name.startswith("_")}


def read_tflite(path: Path) -> TFLiteSummary:
    """Verify and summarise a .tflite file; InvalidModelError if it is not a whole TFLite model."""
    from edgelm.model import require_regular_file

    path = Path(path)
    size = require_regular_file(path)
    if size < 8:
        raise InvalidModelError(f"{path}: too short to be a TFLite model ({size} bytes)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[4:8] != TFLITE_IDENTIFIER:
            raise InvalidModelError(
                f"{path}: not a TFLite model (no {TFLITE_IDENTIFIER.decode()} identifier); re-export it with edgelm"
            )
        try:
            return _walk(buf, size)
        except (
            struct.error,
            IndexError,
            ValueError,
            TypeError,
            UnicodeDecodeError,
            AttributeError,
            OverflowError,
            RecursionError,
        ) as err:
            raise InvalidModelError(
                f"{path}: the TFLite flatbuffer is damaged or truncated ({type(err).__name__}: {err}); re-export it"
            ) from err


def check_tflite_file(path: Path) -> None:
    read_tflite(path)


class _Budget:
    """Work allowed for one walk: linear in the file size.

    Each table or vector element edgelm visits occupies at least 4 bytes in a well-formed
    file, so a walk that visits more than size/4 of them (plus slack) is following the same
    bytes again through aliased offsets, which a hostile file uses to make the cost a
    product of counts; it is refused instead of followed.
    """

    def __init__(self, size: int):
        self.left = size // 4 + 4096

    def spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise ValueError("the flatbuffer revisits its own tables (aliased offsets) more than its size allows")


def _buffer_lengths(model: Any, size: int, budget: _Budget) -> list[int]:
    """Each buffer's length, checked to lie inside the file."""
    buffers = []
    for b in range(model.BuffersLength()):
        budget.spend()
        buffer = model.Buffers(b)
        offset, length = buffer.Offset(), buffer.Size()
        if offset:  # data stored after the flatbuffer (models over 2 GB)
            if offset + length > size:
                raise ValueError(f"buffer {b} points past the end of the file")
        else:
            length = buffer.DataLength()
            if length:
                buffer.Data(length - 1)  # the last byte must be inside the file
        buffers.append(length)
    return buffers


def _operator_names(model: Any, builtins: dict[int, str], budget: _Budget) -> list[str]:
    codes = []
    for c in range(model.OperatorCodesLength()):
        budget.spend()
        code = model.OperatorCodes(c)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        custom = code.CustomCode()
        codes.append(custom.decode() if custom else builtins.get(builtin, f"builtin {builtin}"))
    return codes


def _count_subgraph(
    subgraph: Any,
    buffers: list[int],
    codes: list[str],
    types: dict[int, str],
    counted: set[int],
    summary: TFLiteSummary,
    budget: _Budget,
) -> None:
    """Add one subgraph's weight tensors (each buffer once: signatures share weights) and operators."""
    for t in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(t)
        rank = tensor.ShapeLength()
        budget.spend(1 + rank)
        if rank > MAX_RANK:
            raise ValueError(f"tensor {t} has {rank} dimensions")
        [tensor.Shape(d) for d in range(rank)]
        index = tensor.Buffer()
        if index >= len(buffers):
            raise ValueError(f"tensor {t} refers to buffer {index} of {len(buffers)}")
        if buffers[index] and index not in counted:
            counted.add(index)
            name = types.get(tensor.Type(), f"type {tensor.Type()}")
            summary.tensor_types[name] += 1
            summary.weight_bytes[name] += buffers[index]
    for o in range(subgraph.OperatorsLength()):
        budget.spend()
        opcode = subgraph.Operators(o).OpcodeIndex()
        if opcode >= len(codes):
            raise ValueError(f"operator {o} uses opcode {opcode} of {len(codes)}")
        summary.operators[codes[opcode]] += 1


def _walk(buf: mmap.mmap, size: int) -> TFLiteSummary:
    from ai_edge_litert import schema_py_generated as schema

    budget = _Budget(size)
    types, builtins = _names(schema.TensorType), _names(schema.BuiltinOperator)
    model = schema.Model.GetRootAs(buf, 0)
    summary = TFLiteSummary(bytes=size, version=model.Version())
    buffers = _buffer_lengths(model, size, budget)
    codes = _operator_names(model, builtins, budget)
    if not model.SubgraphsLength():
        raise ValueError("no subgraphs")
    counted: set[int] = set()
    for s in range(model.SubgraphsLength()):
        budget.spend()
        _count_subgraph(model.Subgraphs(s), buffers, codes, types, counted, summary, budget)
    subgraphs = model.SubgraphsLength()
    for g in range(model.SignatureDefsLength()):
        budget.spend()
        signature = model.SignatureDefs(g)
        budget.spend(signature.InputsLength() + signature.OutputsLength())
        inputs = [signature.Inputs(i).Name().decode() for i in range(signature.InputsLength())]
        outputs = [signature.Outputs(i).Name().decode() for i in range(signature.OutputsLength())]
        key = signature.SignatureKey().decode()
        summary.signatures[key] = (inputs, outputs)
        if signature.SubgraphIndex() >= subgraphs:
            raise ValueError(f"signature {key} refers to subgraph {signature.SubgraphIndex()} of {subgraphs}")
        summary.signature_operators[key] = model.Subgraphs(signature.SubgraphIndex()).OperatorsLength()
    return summary
