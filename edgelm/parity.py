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
GREEDY_PROMPT_TOKENS = 64
GREEDY_NEW_TOKENS = 64


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


def measure_parity(
    artifact: Session,
    reference: Session,
    ids: list[int],
    gate: float,
    settings: ParitySettings = ParitySettings(),
) -> ParityResult:
    """Score `artifact` against `reference` on token ids of the parity text.

    Each window is prefilled from an empty cache in both sessions; reference logits are
    recomputed per window rather than held for the whole text (4,096 × vocab floats).
    """
    nll = ref_nll = kl_sum = 0.0
    agree = scored = 0
    max_diff = None
    for chunk in settings.windows(ids):
        targets = np.asarray(chunk[1:])
        artifact.reset()
        reference.reset()
        logits = artifact.prefill(np.asarray(chunk, dtype=np.int64))[:-1]
        ref_logits = reference.prefill(np.asarray(chunk, dtype=np.int64))[:-1]
        if max_diff is None:
            max_diff = float(np.max(np.abs(logits.astype(np.float64) - ref_logits)))
        logp, ref_logp = _log_softmax(logits), _log_softmax(ref_logits)
        rows = np.arange(len(targets))
        nll -= float(logp[rows, targets].sum())
        ref_nll -= float(ref_logp[rows, targets].sum())
        kl_sum += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
        agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        scored += len(targets)
    prompt = ids[:GREEDY_PROMPT_TOKENS]
    ours, theirs = greedy_continuation(artifact, prompt), greedy_continuation(reference, prompt)
    match = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    ppl, ref_ppl = float(np.exp(nll / scored)), float(np.exp(ref_nll / scored))
    ratio = ppl / ref_ppl
    return ParityResult(
        tokens_scored=scored,
        perplexity=ppl,
        reference_perplexity=ref_ppl,
        ppl_ratio=ratio,
        top1_agreement=agree / scored,
        mean_kl=kl_sum / scored,
        max_abs_logit_diff_first_window=float(max_diff or 0.0),
        greedy_match_tokens=match,
        greedy_tokens=len(ours),
        gate=gate,
        passed=ratio <= gate,
    )
