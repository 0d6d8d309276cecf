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
from typing import Any, BinaryIO

from edgelm.errors import InvalidModelError

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY_ITEMS = 64  # longer arrays (vocabularies) are summarised by their length
MAX_DIMS = 8
MAX_ARRAY_DEPTH = 2  # llama.cpp itself reads no nested arrays
MAX_ARRAY_ITEMS = 4_000_000  # string arrays: vocabularies (262k) and merges (under 1M) with room to spare
MAX_TENSORS = 1_000_000


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

    def integer(self, key: str, default: int) -> int:
        """An integer metadata value (default when absent); InvalidModelError when it is another type."""
        value = self.metadata.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidModelError(f"GGUF metadata {key} is {str(value)[:40]!r}, not an integer; the file is corrupt")
        return value

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
    """Reads a file front to back; every length is checked against the bytes left before reading."""

    def __init__(self, fh: BinaryIO, size: int, path: Path):
        self.fh, self.size, self.pos, self.path = fh, size, 0, path

    def fail(self, what: str) -> InvalidModelError:
        return InvalidModelError(
            f"{self.path}: corrupt GGUF header ({what} at byte {self.pos}); re-download or re-convert it"
        )

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"needs {n} more bytes, file ends first")
        chunk = self.fh.read(n)
        if len(chunk) != n:
            raise self.fail("the file ended while reading it")
        self.pos += n
        return chunk

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"needs {n} more bytes, file ends first")
        self.fh.seek(n, 1)
        self.pos += n

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.scalar("<Q")
        if n * min_item_bytes > self.size - self.pos:
            raise self.fail(f"{what} {n} cannot fit in the file")
        return n

    def string(self) -> str:
        n = self.count("string length", 1)
        return self.take(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.skip(self.count("string length", 1))

    def value(self, value_type: int, depth: int = 0) -> Any:
        """One metadata value. Arrays of scalars are skipped in one step past their first items;
        string arrays are walked (each has its own length) up to MAX_ARRAY_ITEMS; arrays nest at
        most MAX_ARRAY_DEPTH deep."""
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
            item_type = self.scalar("<I")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                n = self.count("array length", struct.calcsize(fmt))
                kept = min(n, _KEEP_ARRAY_ITEMS)
                items = [self.scalar(fmt) for _ in range(kept)]
                self.skip((n - kept) * struct.calcsize(fmt))
            elif item_type in (_STRING, _ARRAY):
                n = self.count("array length", 8 if item_type == _STRING else 12)
                if n > MAX_ARRAY_ITEMS:
                    raise self.fail(f"array of {n} items (limit {MAX_ARRAY_ITEMS})")
                kept = min(n, _KEEP_ARRAY_ITEMS)
                items = [self.value(item_type, depth + 1) for _ in range(kept)]
                for _ in range(n - kept):
                    if item_type == _STRING:
                        self.skip_string()
                    else:
                        self.value(item_type, depth + 1)
            else:
                raise self.fail(f"unknown array item type {item_type}")
            return items if n <= _KEEP_ARRAY_ITEMS else {"array_length": n, "first": items[:8]}
        raise self.fail(f"unknown metadata value type {value_type}")


def read_gguf_summary(path: Path, *, max_header_bytes: int = 1 << 28) -> GGUFSummary:
    """Read and validate a GGUF file's header, metadata and tensor table.

    Raises InvalidModelError for anything malformed: wrong magic, truncation, counts that
    cannot fit in the file, unknown tensor types, or tensor data past the end of the file.
    """
    path = Path(path)
    from edgelm.model import require_regular_file

    file_bytes = require_regular_file(path)
    if file_bytes < 24:
        raise InvalidModelError(f"{path}: {file_bytes} bytes is too short to be a GGUF file")
    with open(path, "rb") as fh:
        return _read_summary(fh, path, file_bytes, min(file_bytes, max_header_bytes))


def _read_summary(fh: BinaryIO, path: Path, file_bytes: int, header_limit: int) -> GGUFSummary:
    cur = _Cursor(fh, header_limit, path)
    magic = cur.take(4)
    if magic != GGUF_MAGIC:
        raise InvalidModelError(
            f"{path}: not a GGUF file (magic {magic!r}); pass a .gguf file or a Hugging Face folder"
        )
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise cur.fail(f"unsupported GGUF version {version}")
    n_tensors = cur.count("tensor count", 24)
    n_kv = cur.count("metadata count", 12)
    if n_tensors > MAX_TENSORS:
        raise cur.fail(f"{n_tensors} tensors (limit {MAX_TENSORS})")
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
        if any(dim >= 1 << 40 for dim in shape):
            raise cur.fail(f"tensor {name!r} has a dimension of 2**40 or more")
        summary.tensors.append(GGUFTensorInfo(name, shape, cur.scalar("<I"), cur.scalar("<Q")))
    alignment = summary.metadata.get("general.alignment", 32)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or not 0 < alignment <= 1 << 16
        or alignment & (alignment - 1)
    ):
        raise cur.fail(f"general.alignment {str(alignment)[:40]!r} is not a power of two up to 65536")
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
