"""A defensive GGUF header reader: metadata and tensor table, never trusting a length.

Every count and length in a GGUF header is checked against the bytes left in the file
before anything is allocated, so a truncated or hostile file is an InvalidModelError, not
a crash or a multi-GB allocation. Layout (gguf v2/v3, little endian): magic "GGUF",
uint32 version, uint64 tensor_count, uint64 kv_count, the key/values, the tensor infos,
then tensor data aligned to `general.alignment` (32 by default).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidModelError

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY_ITEMS = 64  # longer arrays (vocabularies) are summarised by their length
MAX_DIMS = 8


@dataclass
class GGUFTensorInfo:
    name: str
    shape: list[int]
    ggml_type: int
    offset: int


@dataclass
class GGUFSummary:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_bytes: int = 0

    @property
    def num_parameters(self) -> int:
        total = 0
        for tensor in self.tensors:
            count = 1
            for dim in tensor.shape:
                count *= dim
            total += count
        return total


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str) -> InvalidModelError:
        return InvalidModelError(f"{self.path}: corrupt GGUF header ({what} at byte {self.pos}); re-download or re-convert it")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"needs {n} more bytes, file ends first")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.scalar("<Q")
        if n * min_item_bytes > len(self.data) - self.pos:
            raise self.fail(f"{what} {n} cannot fit in the file")
        return n

    def string(self) -> str:
        n = self.count("string length", 1)
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type = self.scalar("<I")
            item_bytes = 8 if item_type == _STRING else struct.calcsize(_SCALARS.get(item_type, "<B"))
            n = self.count("array length", item_bytes)
            items = [self.value(item_type) for _ in range(n)]
            return items if n <= _KEEP_ARRAY_ITEMS else {"array_length": n, "first": items[:8]}
        raise self.fail(f"unknown metadata value type {value_type}")


def read_gguf_summary(path: Path, *, max_header_bytes: int = 1 << 28) -> GGUFSummary:
    """Read and validate a GGUF file's header, metadata and tensor table.

    Raises InvalidModelError for anything malformed: wrong magic, truncation, counts that
    cannot fit in the file, unknown tensor types, or tensor data past the end of the file.
    """
    path = Path(path)
    file_bytes = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(min(file_bytes, max_header_bytes))
    if head[:4] != GGUF_MAGIC:
        raise InvalidModelError(f"{path}: not a GGUF file (magic {head[:4]!r}); pass a .gguf file or a Hugging Face folder")
    cur = _Cursor(head, path)
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise cur.fail(f"unsupported GGUF version {version}")
    n_tensors = cur.count("tensor count", 24)
    n_kv = cur.count("metadata count", 12)
    summary = GGUFSummary(version=version, file_bytes=file_bytes)
    for _ in range(n_kv):
        key = cur.string()
        summary.metadata[key] = cur.value(cur.scalar("<I"))
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = [cur.scalar("<Q") for _ in range(n_dims)]
        summary.tensors.append(GGUFTensorInfo(name, shape, cur.scalar("<I"), cur.scalar("<Q")))
    alignment = int(summary.metadata.get("general.alignment", 32)) or 32
    summary.data_offset = (cur.pos + alignment - 1) // alignment * alignment
    _check_tensor_extents(summary, path)
    return summary


def _check_tensor_extents(summary: GGUFSummary, path: Path) -> None:
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:  # runtime-only installs: header checks above still hold
        return
    for tensor in summary.tensors:
        try:
            block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)]
        except (ValueError, KeyError) as err:
            raise InvalidModelError(f"{path}: tensor {tensor.name!r} has unknown type {tensor.ggml_type}") from err
        count = 1
        for dim in tensor.shape:
            count *= dim
        end = summary.data_offset + tensor.offset + count // block * type_bytes
        if end > summary.file_bytes:
            raise InvalidModelError(
                f"{path}: tensor {tensor.name!r} runs past the end of the file ({end} > {summary.file_bytes} bytes); "
                "the file is truncated"
            )
