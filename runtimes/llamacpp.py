"""llama.cpp runtime through llama-cpp-python's low-level API (raw logits per position).

The high-level `Llama` class keeps its own sampling loop; edgelm needs raw logits for
every prefilled position (parity) and one step at a time (its shared generation loop),
so this adapter drives `llama_decode` directly: one context, one reusable batch, the KV
cache kept inside llama.cpp. The file is mmapped. Every file's header is read by
edgelm's defensive GGUF reader before llama.cpp parses it.

KV cache precision follows the weights: F32 for an F32 file (so that an fp32 export
can match torch to fp32 tolerance), llama.cpp's default F16 otherwise.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

import llama_cpp  # at module level, so that the runtime registry reports it when missing
import numpy as np

from edgelm.errors import DeviceError, InvalidModelError, PromptError, UnsupportedError
from edgelm.gguf_header import GGUFSummary, read_gguf_summary
from edgelm.isolation import open_isolated, runs_here
from edgelm.session import Capabilities, token_ids

DEFAULT_CONTEXT = 4096  # KV cache slots allocated up front (llama.cpp's cache is fixed-size)
BATCH = 512
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
FILE_TYPE_ALL_F32 = 0

_init_lock = threading.Lock()
_initialized = False


def llama_library():
    """llama_cpp with its backend initialised and its logging silenced, once per process (edgelm
    shows progress). Public: the GGUF exporter and the vendor check use the same library."""
    global _initialized
    with _init_lock:
        if not _initialized:
            llama_cpp.llama_backend_init()
            if not os.environ.get("EDGELM_LLAMA_LOG"):  # set it to see llama.cpp's own log when debugging a file
                llama_library.silence = llama_cpp.llama_log_callback(
                    lambda level, text, user_data: None
                )  # kept alive here
                llama_cpp.llama_log_set(llama_library.silence, ctypes.c_void_p())
            _initialized = True
    return llama_cpp


def _load_model(path: Path, *, vocab_only: bool = False, gpu_layers: int = 0, checked: bool = False):
    """llama.cpp's model; `checked` says the caller already read the header defensively."""
    llama_library()
    if not checked:
        read_gguf_summary(
            path
        )  # InvalidModelError for a truncated, hostile or non-GGUF file, before llama.cpp parses it
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.n_gpu_layers = gpu_layers
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise InvalidModelError(
            f"{path}: llama.cpp could not load this GGUF (unsupported architecture, tensor "
            "types or metadata); re-export it with edgelm or check `edgelm inspect`"
        )
    return model


def _tokenize(vocab: object, text: str, add_special: bool) -> list[int]:
    llama_library()
    data = text.encode("utf-8")
    capacity = len(data) + 8
    buffer = (llama_cpp.llama_token * capacity)()
    count = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, capacity, add_special, False)
    if count < 0:
        raise InvalidModelError(f"llama.cpp needed {-count} tokens for a text of {len(data)} bytes")
    return list(buffer[:count])


def tokenize_with_vocab_file(path: Path, text: str, add_special: bool = False) -> list[int]:
    """Tokenize `text` with llama.cpp, loading only the vocabulary of the GGUF at `path`."""
    llama_library()
    model = _load_model(path, vocab_only=True)
    try:
        return _tokenize(llama_cpp.llama_model_get_vocab(model), text, add_special)
    finally:
        llama_cpp.llama_model_free(model)


class _Context:
    """A llama.cpp model + context + batch, freed together."""

    def __init__(
        self,
        path: Path,
        summary: GGUFSummary,
        *,
        n_ctx: int,
        n_batch: int,
        threads: int,
        gpu_layers: int,
        embeddings: bool,
        sequences: int = 1,
    ):
        self._lib = llama_library()
        self.model = _load_model(path, gpu_layers=gpu_layers, checked=True)
        f32 = summary.integer("general.file_type", -1) == FILE_TYPE_ALL_F32
        params = llama_cpp.llama_context_default_params()
        train = llama_cpp.llama_model_n_ctx_train(self.model)
        self.n_ctx = min(n_ctx, train) if train > 0 else n_ctx
        params.n_ctx = self.n_ctx * sequences  # each sequence gets n_ctx cells of its own (kv_unified off)
        params.n_seq_max = sequences
        params.n_batch = params.n_ubatch = min(n_batch, self.n_ctx)
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = GGML_TYPE_F32 if f32 else GGML_TYPE_F16
        if f32:  # CPU flash attention rounds through F16; an fp32 file is meant to match torch at fp32
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.embeddings = embeddings
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise InvalidModelError(f"{path}: llama.cpp could not create a context (n_ctx {self.n_ctx})")
        self.n_batch = params.n_batch
        self.sequences = sequences
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.kv_type = "F32" if f32 else "F16"

    def decode(self, ids: np.ndarray, start: int) -> None:
        """Run ids (<= n_batch) at positions start.. in sequence 0, with logits for every position."""
        self._run([(0, ids, start)], every_position=True)

    def decode_sequences(self, work: list[tuple[int, np.ndarray, int]]) -> np.ndarray:
        """One llama_decode over several sequences: (sequence, ids, start position) each, ids of
        all together <= n_batch; the logits [len(work), vocab] of each one's last position."""
        last = self._run(work, every_position=False)
        return np.stack(
            [
                np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
                for index in last  # llama.cpp indexes outputs by their token's place in the batch
            ]
        )

    def _run(self, work: list[tuple[int, np.ndarray, int]], every_position: bool) -> list[int]:
        """Fill the batch with each (sequence, ids, start) and decode it; logits for every
        position, or only each sequence's last. Returns the batch index of each one's last token."""
        batch, i, last = self.batch, 0, []
        for sequence, ids, start in work:
            for offset, token in enumerate(ids):
                batch.token[i], batch.pos[i] = int(token), start + offset
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, sequence
                batch.logits[i] = every_position or offset == len(ids) - 1
                i += 1
            last.append(i - 1)
        batch.n_tokens = i
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise InvalidModelError(
                f"llama_decode failed with status {status} ({len(work)} sequences, {i} tokens, "
                f"context {self.n_ctx} tokens each)"
            )
        return last

    def logits(self, rows: int) -> np.ndarray:
        pointer = self._lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab)).copy()

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)

    def forget_from(self, position: int, sequence: int = 0) -> None:
        """Drop a sequence's cache cells at `position` and after (llama.cpp attends to every
        cell of the sequence, so stale ones must go, not just be overwritten)."""
        if not self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.ctx), sequence, position, -1):
            raise InvalidModelError(f"llama.cpp could not drop its cache from position {position}")

    def free(self) -> None:
        if self.ctx:
            self._lib.llama_batch_free(self.batch)
            self._lib.llama_free(self.ctx)
            self._lib.llama_model_free(self.model)
            self.ctx = self.model = None


class LlamaCppSession:
    """A decoder: prefill(ids) -> logits [n, vocab], decode(id) -> logits [vocab]."""

    def __init__(self, context: _Context, device: str):
        self._c = context
        self._pos = 0
        self.capabilities = Capabilities(
            max_context=context.n_ctx,
            vocab_size=context.n_vocab,
            notes={"kv_cache": f"llama.cpp, {context.kv_type}, {context.n_ctx} slots"},
        )

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        ids = token_ids(ids, self.capabilities)
        out = []
        for start in range(0, len(ids), self._c.n_batch):
            chunk = ids[start : start + self._c.n_batch]
            self._c.decode(chunk, self._pos)
            self._pos += len(chunk)
            out.append(self._c.logits(len(chunk)))
        return np.concatenate(out)

    def decode(self, token_id: int) -> np.ndarray:
        self._c.decode(token_ids([token_id], self.capabilities), self._pos)
        self._pos += 1
        return self._c.logits(1)[0]

    def reset(self) -> None:
        self._c.clear()
        self._pos = 0

    def truncate(self, length: int) -> None:
        length = min(self._pos, max(0, length))
        self._c.forget_from(length)
        self._pos = length

    def close(self) -> None:
        self._c.free()


class LlamaCppBatch:
    """Several sequences in one llama.cpp context, advanced together: one `step` runs every
    sequence's next tokens (a prompt chunk or one generated token) in one llama_decode, so the
    weights are read once per step for all of them (what a server with concurrent clients
    wants; edgelm.serve.batching schedules it). Each sequence has `capabilities.max_context`
    cells of its own."""

    def __init__(self, context: _Context, device: str):
        self._c = context
        self.sequences = context.sequences
        self.n_batch = context.n_batch
        self._pos = [0] * self.sequences
        self.capabilities = Capabilities(
            max_context=context.n_ctx,
            vocab_size=context.n_vocab,
            notes={"kv_cache": f"llama.cpp, {context.kv_type}, {self.sequences} × {context.n_ctx} slots"},
        )

    def step(self, work: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """(sequence, ids) each, ids of all together <= n_batch; the logits [len(work), vocab]
        of each one's last new position."""
        checked = [(int(sequence), token_ids(ids, self.capabilities)) for sequence, ids in work]
        sequences = [sequence for sequence, _ in checked]
        if len(set(sequences)) != len(sequences) or sum(len(ids) for _, ids in checked) > self.n_batch:
            raise ValueError(f"a step takes each sequence once and at most {self.n_batch} ids in all")
        for sequence, ids in checked:
            if not 0 <= sequence < self.sequences or not len(ids):
                raise ValueError(f"sequence {sequence} with {len(ids)} ids is not a step of this batch")
            if self._pos[sequence] + len(ids) > self._c.n_ctx:
                raise PromptError(f"sequence {sequence} would pass its {self._c.n_ctx} cache slots")
        logits = self._c.decode_sequences([(seq, ids, self._pos[seq]) for seq, ids in checked])
        for sequence, ids in checked:
            self._pos[sequence] += len(ids)
        return logits

    def truncate(self, sequence: int, length: int) -> None:
        """Keep a sequence's first `length` positions (0: start it afresh)."""
        length = min(self._pos[sequence], max(0, length))
        self._c.forget_from(length, sequence)
        self._pos[sequence] = length

    def close(self) -> None:
        self._c.free()


class LlamaCppEncoderSession:
    """An embedding model (BERT-style, mean pooling in llama.cpp), L2-normalised like every
    edgelm encoder. Rows run one at a time: a non-causal model sees its whole input at once."""

    def __init__(self, context: _Context, device: str):
        self._c = context
        self.capabilities = Capabilities(max_context=context.n_ctx, notes={"output": "embeddings"})

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        lib, dim = self._c._lib, self._c._lib.llama_model_n_embd(self._c.model)
        out = np.zeros((len(input_ids), dim), dtype=np.float32)
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            self._c.clear()
            self._c.decode(np.asarray(ids)[np.asarray(mask) > 0], 0)
            vector = np.ctypeslib.as_array(lib.llama_get_embeddings_seq(self._c.ctx, 0), shape=(dim,))
            out[row] = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return out

    def close(self) -> None:
        self._c.free()


class LlamaCppAdapter:
    name = "llama.cpp"

    def version(self) -> str:
        from importlib import metadata

        return f"llama-cpp-python {metadata.version('llama-cpp-python')}"

    def preload(self) -> None:
        """Load and initialise llama.cpp without opening a file (edgelm.isolation's fork server)."""
        llama_library()

    def available_devices(self) -> tuple[str, ...]:
        return ("cpu", "gpu") if llama_library().llama_supports_gpu_offload() else ("cpu",)

    def open(
        self, path: Path, device: str = "cpu", threads: int | None = None
    ) -> LlamaCppSession | LlamaCppEncoderSession:
        return self._open(Path(path), device, threads, sequences=None)

    def open_batch(self, path: Path, sequences: int, device: str = "cpu", threads: int | None = None) -> LlamaCppBatch:
        """A decoder with `sequences` sequences advanced together (LlamaCppBatch)."""
        if sequences < 1:
            raise ValueError(f"a batch needs at least one sequence, not {sequences}")
        return self._open(Path(path), device, threads, sequences=sequences)

    def _open(self, path: Path, device: str, threads: int | None, sequences: int | None) -> Any:
        """A session (`sequences` None) or a batch of that many sequences."""
        if device not in self.available_devices():
            raise DeviceError(
                f"this llama-cpp-python build cannot use {device!r} (it was built without GPU offload); "
                f"available: {', '.join(self.available_devices())}. Rebuild it with CMAKE_ARGS="
                '"-DGGML_CUDA=on" (or Vulkan/Metal) for a GPU'
            )
        summary = read_gguf_summary(path)
        if not runs_here(path):  # its native code can end the process on a damaged file
            return open_isolated(self.name, path, device, threads, sequences=sequences)
        arch = str(summary.metadata.get("general.architecture"))
        embeddings = summary.metadata.get(f"{arch}.pooling_type") is not None
        if embeddings and sequences is not None:
            raise UnsupportedError(f"{path} is an encoder: there are no sequences to batch")
        n_ctx = (
            min(summary.integer(f"{arch}.context_length", DEFAULT_CONTEXT), 1 << 20) if embeddings else DEFAULT_CONTEXT
        )
        if n_ctx <= 0:
            raise InvalidModelError(f"{path}: {arch}.context_length is {n_ctx}; the file is corrupt")
        context = _Context(
            path,
            summary,
            n_ctx=n_ctx,
            n_batch=n_ctx if embeddings else BATCH,
            threads=threads or os.cpu_count() or 1,
            gpu_layers=-1 if device == "gpu" else 0,
            embeddings=embeddings,
            sequences=sequences or 1,
        )
        if sequences is not None:
            return LlamaCppBatch(context, device)
        return LlamaCppEncoderSession(context, device) if embeddings else LlamaCppSession(context, device)


ADAPTER = LlamaCppAdapter()
