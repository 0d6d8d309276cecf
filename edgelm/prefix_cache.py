"""A session's KV cache and the token ids it holds, so a prompt that starts like the last one
continues from the shared prefix instead of prefilling it again.

A chat client sends the whole conversation every turn; without this, each turn's time to first
token grows with the history. Every edgelm decoder session can cut its cache back
(`Session.truncate`): position-indexed caches (ExecuTorch, LiteRT) by moving the position,
llama.cpp by dropping cells, ONNX by slicing the cached keys and values (one copy), torch by
cropping its DynamicCache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgelm.session import Session


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (token ids, characters) two sequences share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class CachedPrefix:
    """A session plus the ids its cache holds (exactly what was fed, in order)."""

    def __init__(self, session: Session, reuse: bool = True) -> None:
        self.session = session
        self.reuse = reuse
        self.ids: list[int] = []
        self.reused = 0  # prompt tokens the last start() took from the cache
        self.prompt_length = 0  # the last start()'s prompt (a chat's next turn resends all of it)

    def start(self, prompt_ids: list[int]) -> np.ndarray:
        """Bring the cache to `prompt_ids` and return the last position's logits [vocab]. At least
        one token is prefilled (its logits are the answer), so a prompt equal to the cached ids
        re-runs its last token."""
        keep = min(common_prefix(self.ids, prompt_ids), len(prompt_ids) - 1) if self.reuse else 0
        self.ids = []  # unknown until the prefill below returns (it may raise)
        if keep > 0:
            self.session.truncate(keep)
        else:
            self.session.reset()
        logits = self.session.prefill(np.asarray(prompt_ids[keep:], dtype=np.int64))[-1]
        self.ids, self.reused, self.prompt_length = list(prompt_ids), keep, len(prompt_ids)
        return logits

    def feed(self, token_id: int) -> np.ndarray:
        """Append one token; its logits [vocab]."""
        known, self.ids = self.ids, []
        logits = self.session.decode(token_id)
        self.ids = [*known, token_id]
        return logits
