"""Parity: how closely an artifact follows the fp32 source model, on real text.

The text is a fixed slice of CPython's own documentation (`pydoc_data.topics`, shipped
with every Python): topics sorted by key, joined by blank lines, first 40,000 characters.
Windows are `window` tokens long, `stride` apart (non-overlapping by default, as the
peer baselines were measured), over the first `max_tokens` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgelm.session import Session

PARITY_TEXT_CHARS = 40_000
DEFAULT_GATES = {"fp32": 1.005, "fp16": 1.01, "int8": 1.03, "int4": 1.10}
# Perplexity alone can hide a drifting artifact (an int4 at ratio 1.04 with KL 0.38), so a
# decoder artifact is also held to a mean KL and to its top-1 agreement on the positions where
# the reference is confident (top probability >= CONFIDENT; disagreeing where the reference
# itself hesitates is noise, and a random test model has no such positions).
KL_GATES = {"fp32": 0.001, "fp16": 0.005, "int8": 0.05, "int4": 0.15}
CONFIDENT_TOP1_GATES = {"fp32": 0.99, "fp16": 0.98, "int8": 0.93, "int4": 0.85}
CONFIDENT = 0.5
GREEDY_PROMPT_TOKENS = 64
GREEDY_NEW_TOKENS = 64
ROWS = 32  # positions scored at once


def parity_text() -> str:
    """The fixed real English text every artifact is measured on."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:PARITY_TEXT_CHARS]


@dataclass(frozen=True)
class ParitySettings:
    max_tokens: int = 4096
    window: int = 512
    stride: int = 512

    def windows(self, ids: list[int]) -> Iterator[list[int]]:
        ids = ids[: self.max_tokens]
        for start in range(0, max(1, len(ids) - 1), self.stride):
            chunk = ids[start : start + self.window]
            if len(chunk) >= 2:
                yield chunk


@dataclass
class ParityResult:
    tokens_scored: int
    perplexity: float
    reference_perplexity: float
    ppl_ratio: float
    top1_agreement: float
    mean_kl: float
    max_abs_logit_diff_first_window: float
    greedy_match_tokens: int  # identical leading tokens of a 64-token greedy continuation
    greedy_tokens: int
    gate: float
    passed: bool
    confident_positions: int = 0  # positions where the reference's top probability >= CONFIDENT
    confident_top1_agreement: float = 1.0
    max_kl: float | None = None  # the KL and confident top-1 gates it was held to
    min_confident_top1: float | None = None

    def failure(self) -> str | None:
        """Why it misses its gates, or None."""
        if self.ppl_ratio > self.gate:
            return f"ppl ratio {self.ppl_ratio:.4f} > gate {self.gate}"
        if self.max_kl is not None and self.mean_kl > self.max_kl:
            return f"mean KL {self.mean_kl:.4f} > gate {self.max_kl}"
        if self.min_confident_top1 is not None and self.confident_top1_agreement < self.min_confident_top1:
            return (
                f"top-1 agreement {self.confident_top1_agreement:.1%} where the reference is confident "
                f"< gate {self.min_confident_top1:.0%}"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy_continuation(session: Session, prompt: list[int], new_tokens: int = GREEDY_NEW_TOKENS) -> list[int]:
    session.reset()
    out: list[int] = []
    logits = session.prefill(np.asarray(prompt, dtype=np.int64))[-1]
    for _ in range(new_tokens):
        out.append(int(np.argmax(logits)))
        logits = session.decode(out[-1])
    return out


@dataclass
class _Tally:
    """Sums over the parity windows: both sessions' NLL, KL, top-1 agreement (all positions and
    those where the reference is confident), and the first window's largest logit difference."""

    nll: float = 0.0
    ref_nll: float = 0.0
    kl_sum: float = 0.0
    agree: int = 0
    scored: int = 0
    confident: int = 0
    confident_agree: int = 0
    max_diff: float | None = None

    def add_window(self, logits: np.ndarray, ref_logits: np.ndarray, targets: np.ndarray) -> None:
        """One window, ROWS positions at a time: a window's float64 log-probabilities at a
        128k–262k vocabulary are gigabytes (the export's peak memory at 1B), a block of rows is
        tens of megabytes."""
        first = self.max_diff is None
        for start in range(0, len(targets), ROWS):
            block = slice(start, start + ROWS)
            self._add(np.asarray(logits[block]), np.asarray(ref_logits[block]), targets[block], first)

    def _add(self, logits: np.ndarray, ref_logits: np.ndarray, targets: np.ndarray, first_window: bool) -> None:
        if first_window:
            diff = float(np.max(np.abs(logits.astype(np.float64) - ref_logits)))
            self.max_diff = max(self.max_diff or 0.0, diff)
        logp, ref_logp = _log_softmax(logits), _log_softmax(ref_logits)
        rows = np.arange(len(targets))
        self.nll -= float(logp[rows, targets].sum())
        self.ref_nll -= float(ref_logp[rows, targets].sum())
        self.kl_sum += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
        same = logits.argmax(-1) == ref_logits.argmax(-1)
        self.agree += int(same.sum())
        sure = ref_logp.max(-1) >= np.log(CONFIDENT)
        self.confident += int(sure.sum())
        self.confident_agree += int(same[sure].sum())
        self.scored += len(targets)


def measure_parity(
    artifact: Session,
    reference: Session,
    ids: list[int],
    gate: float,
    settings: ParitySettings = ParitySettings(),
    max_kl: float | None = None,
    min_confident_top1: float | None = None,
) -> ParityResult:
    """Score `artifact` against `reference` on token ids of the parity text.

    Each window is prefilled from an empty cache in both sessions, one window at a time (the
    whole text's logits are 4,096 × vocab floats); an export passes its reference wrapped in
    edgelm.memo_session, so the fp32 model computes each window once for all artifacts.
    """
    tally = _Tally()
    for chunk in settings.windows(ids):
        artifact.reset()
        reference.reset()
        logits = artifact.prefill(np.asarray(chunk, dtype=np.int64))[:-1]
        ref_logits = reference.prefill(np.asarray(chunk, dtype=np.int64))[:-1]
        tally.add_window(logits, ref_logits, np.asarray(chunk[1:]))
    prompt = ids[:GREEDY_PROMPT_TOKENS]
    ours, theirs = greedy_continuation(artifact, prompt), greedy_continuation(reference, prompt)
    match = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    scored = tally.scored
    ppl, ref_ppl = float(np.exp(tally.nll / scored)), float(np.exp(tally.ref_nll / scored))
    result = ParityResult(
        tokens_scored=scored,
        perplexity=ppl,
        reference_perplexity=ref_ppl,
        ppl_ratio=ppl / ref_ppl,
        top1_agreement=tally.agree / scored,
        mean_kl=tally.kl_sum / scored,
        max_abs_logit_diff_first_window=float(tally.max_diff or 0.0),
        greedy_match_tokens=match,
        greedy_tokens=len(ours),
        gate=gate,
        passed=True,
        confident_positions=tally.confident,
        confident_top1_agreement=tally.confident_agree / tally.confident if tally.confident else 1.0,
        max_kl=max_kl,
        min_confident_top1=min_confident_top1,
    )
    result.passed = result.failure() is None
    return result
