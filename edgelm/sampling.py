"""Sampling settings and the one next-token sampler every runtime shares.

Pure numpy, so runtime-only installs (no torch) generate exactly like the exporter does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgelm.errors import UnsupportedError

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "repetition_penalty": (int, float),
    "seed": (int,),
    "ignore_eos": (bool,),
}
_KIND_NAMES = {(int,): "an integer", (int, float): "a number", (bool,): "true or false"}


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. temperature=0 means greedy (top_k/top_p are then ignored)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already seen
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings, not included in the output
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if isinstance(value, bool) != (kinds == (bool,)) or not isinstance(value, kinds):
                raise UnsupportedError(
                    f"invalid sampling setting: {name} must be {_KIND_NAMES[kinds]}, not {str(value)[:40]!r}"
                )
            if kinds == (int, float):
                try:
                    finite = math.isfinite(float(value))
                except OverflowError:
                    finite = False
                if not finite:
                    raise UnsupportedError(f"invalid sampling setting: {name} must be a finite number")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise UnsupportedError("invalid sampling setting: stop must be a list of non-empty strings")
        checks = [
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be between 0 and 2**63-1"),
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UnsupportedError(f"invalid sampling setting: {message}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "stop" in known:
            stop = known["stop"]
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, (list, tuple)):
                raise UnsupportedError(
                    f"invalid sampling setting: stop must be a list of strings, not {str(stop)[:40]!r}"
                )
            known["stop"] = tuple(stop)
        return cls(**known)


def apply_repetition_penalty(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (as transformers does): divide positive logits, multiply negative."""
    if penalty == 1.0 or not seen:
        return logits
    logits = logits.copy()
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    values = logits[ids]
    logits[ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def sample_next(logits: np.ndarray, seen: list[int], config: SamplingConfig, rng: np.random.Generator) -> int:
    """Pick the next token id from one position's logits (shape [vocab])."""
    if config.temperature == 0 and config.repetition_penalty == 1.0:
        return int(np.argmax(logits))  # the hot path of greedy decoding: no copy
    logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), seen, config.repetition_penalty)
    if config.temperature == 0:
        return int(np.argmax(logits))
    logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = np.partition(logits, -config.top_k)[-config.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - np.max(logits))
    probs /= probs.sum()
    if config.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cumulative, config.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[-1], p=probs))
