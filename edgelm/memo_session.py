"""The fp32 reference, asked once: an export measures every artifact against the same reference
windows and the same greedy continuation, so their logits are computed once and kept.

A decoder export scores 5–10 artifacts (with their fallback recipes) on the same parity
windows; without a memo the fp32 torch model recomputes each window and each greedy step
for every one of them — minutes per export on a 2-core machine. Logits are keyed by the
whole token history since the last reset, so an answer is only reused for exactly the
question it answered. Large answers (a window's logits: tokens × vocab float32, ~100 MB
for SmolLM2) are kept as .npy files in a scratch folder and read back memory-mapped, so the
export's memory does not grow with the parity text.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

IN_MEMORY_BYTES = 1 << 20  # answers up to this size stay in memory (decode steps); larger go to disk


class MemoizedSession:
    """A decoder session whose prefill/decode answers are remembered by token history."""

    def __init__(self, session: Any, scratch_parent: Path) -> None:
        self._session = session
        self.capabilities = session.capabilities
        self._folder = Path(tempfile.mkdtemp(prefix=".reference-logits-", dir=scratch_parent))
        self._memo: dict[str, np.ndarray | Path] = {}
        self._history: tuple[int, ...] = ()  # what this session has been fed since reset
        self._inner_history: tuple[int, ...] | None = ()  # what the wrapped session has actually run
        self.computed = self.reused = 0

    def _answer(self, ids: tuple[int, ...]) -> np.ndarray:
        history = self._history + ids
        key = hashlib.sha256(np.asarray(history, dtype=np.int64).tobytes()).hexdigest()
        self._history = history
        if key in self._memo:
            self.reused += 1
            kept = self._memo[key]
            return np.load(kept, mmap_mode="r") if isinstance(kept, Path) else kept
        self.computed += 1
        before, self._inner_history = self._inner_history, None  # unknown until the wrapped call returns
        if before != history[: -len(ids)]:  # bring the wrapped cache to this history
            self._session.reset()
            if len(history) > len(ids):
                self._session.prefill(np.asarray(history[: -len(ids)], dtype=np.int64))
        logits = self._session.prefill(np.asarray(ids, dtype=np.int64))
        self._inner_history = history
        if logits.nbytes <= IN_MEMORY_BYTES:
            self._memo[key] = logits
        else:
            path = self._folder / f"{key}.npy"
            np.save(path, logits)
            self._memo[key] = path
        return logits

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._answer(tuple(int(i) for i in np.asarray(ids).reshape(-1)))

    def decode(self, token_id: int) -> np.ndarray:
        return self._answer((int(token_id),))[-1]

    def reset(self) -> None:
        self._history = ()

    def close(self) -> None:
        """Drop the kept answers (the wrapped session stays open: it is the caller's)."""
        self._memo.clear()
        shutil.rmtree(self._folder, ignore_errors=True)
