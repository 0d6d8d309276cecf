"""Parity and profiling for encoders (embeddings, classification), measured the way their
users measure them.

Parity: the first paragraphs of the parity text, each tokenized and truncated to the
model's max length, run in padded batches of 8 (so the attention mask matters) through
the artifact and the fp32 reference; the gate is the minimum cosine similarity between
the two outputs over all texts (for classification, between the label probabilities).

Profile: latency of one input of 128 tokens (p50/p90 over repeated runs), throughput of
a batch of 8 such inputs, peak RSS and file size.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgelm.parity import parity_text
from edgelm.profile import PeakRSSSampler, device_record
from edgelm.session import EncoderSession

ENCODER_GATES = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99, "int4": 0.97}  # minimum cosine similarity
PARITY_TEXTS = 64
BATCH = 8
PROFILE_LENGTH = 128


def encoder_texts(count: int = PARITY_TEXTS) -> list[str]:
    """The first `count` paragraphs (>= 40 characters) of the parity text."""
    paragraphs = [p.strip() for p in parity_text().split("\n\n")]
    return [p for p in paragraphs if len(p) >= 40][:count]


def pad_batch(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id rows into (input_ids, attention_mask), both int64 [batch, longest]."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def run_batched(session: EncoderSession, rows: list[list[int]], batch: int = BATCH, pad_id: int = 0) -> np.ndarray:
    """Run token id rows through `session` in padded batches; float32 [len(rows), size]."""
    return np.concatenate([session.run(*pad_batch(rows[i : i + batch], pad_id)) for i in range(0, len(rows), batch)])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


@dataclass
class EncoderParityResult:
    texts: int
    tokens: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float  # on the raw outputs (embeddings or logits)
    label_agreement: float | None  # classification only: same top label as the reference
    gate: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_encoder_parity(
    artifact: EncoderSession, reference: EncoderSession, rows: list[list[int]], task: str, gate: float, pad_id: int = 0
) -> EncoderParityResult:
    """Compare `artifact` with `reference` on tokenized texts `rows` (see the module doc)."""
    ours, theirs = run_batched(artifact, rows, pad_id=pad_id), run_batched(reference, rows, pad_id=pad_id)
    ours64, theirs64 = ours.astype(np.float64), theirs.astype(np.float64)
    classification = task == "text-classification"
    compared = (_softmax(ours64), _softmax(theirs64)) if classification else (ours64, theirs64)
    cosine = _cosine(*compared)
    return EncoderParityResult(
        texts=len(rows),
        tokens=sum(len(r) for r in rows),
        min_cosine=float(cosine.min()),
        mean_cosine=float(cosine.mean()),
        max_abs_diff=float(np.abs(ours64 - theirs64).max()),
        label_agreement=float((ours.argmax(-1) == theirs.argmax(-1)).mean()) if classification else None,
        gate=gate,
        passed=bool(cosine.min() >= gate),
    )


@dataclass
class EncoderProfile:
    sequence_length: int
    batch: int
    runs: int
    threads: int | None
    load_s: float
    latency_p50_ms: float  # one input of sequence_length tokens
    latency_p90_ms: float
    batch_latency_ms: float  # median, one batch of `batch` inputs
    throughput_per_s: float  # inputs per second at that batch size
    peak_rss_mb: float
    file_bytes: int
    device: dict[str, Any] = field(default_factory=dict)
    rss_scope: str = "process"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderProfile:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def profile_input(ids: list[int], length: int) -> list[int]:
    """`length` tokens of real text (repeated if `ids` is shorter)."""
    return (ids * (length // max(1, len(ids)) + 1))[:length]


def _timings_ms(fn: Any, runs: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - start))
    return out


def profile_encoder(
    session: EncoderSession,
    text_ids: list[int],
    *,
    runs: int = 20,
    batch: int = BATCH,
    load_s: float = 0.0,
    file_bytes: int = 0,
    threads: int | None = None,
    rss_scope: str = "process",
) -> EncoderProfile:
    """Latency at 128 tokens (or the model's max length if shorter) and batch throughput."""
    length = min(PROFILE_LENGTH, session.capabilities.max_context)
    one = pad_batch([profile_input(text_ids, length)])
    many = pad_batch([profile_input(text_ids[i:], length) for i in range(batch)])
    with PeakRSSSampler() as rss:
        single = _timings_ms(lambda: session.run(*one), runs)
        batched = _timings_ms(lambda: session.run(*many), max(3, runs // 4))
    batch_ms = statistics.median(batched)
    return EncoderProfile(
        sequence_length=length,
        batch=batch,
        runs=runs,
        threads=threads,
        load_s=load_s,
        latency_p50_ms=float(np.percentile(single, 50)),
        latency_p90_ms=float(np.percentile(single, 90)),
        batch_latency_ms=batch_ms,
        throughput_per_s=1000 * batch / batch_ms,
        peak_rss_mb=rss.peak / 2**20,
        file_bytes=file_bytes,
        device=device_record(),
        rss_scope=rss_scope,
    )
