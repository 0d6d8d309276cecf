"""Greedy decoding compared across runtimes, allowing near ties.

Two runtimes running the same file differ in the last bits of their kernels (thread split,
accumulation order, how activations are quantized per token). Where the top two logits are
that close, greedy decoding is a coin toss between them and the runtimes may pick different
tokens; everything after differs too. This happens rarely on a trained model, but often on
random weights at real shapes (nearly flat logits over 150k tokens), which is what the size
benchmarks export. So a vendor's text that leaves edgelm's at a near tie is followed down the
other branch: edgelm decodes greedily again from the vendor's choice, and the vendor passes if
its whole text is one of edgelm's greedy paths that differ only at near ties. A vendor that
leaves edgelm's path anywhere else fails as before.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TIE_MARGIN = 0.05  # logits: closer than this, the runtimes' rounding decides (trained models' top-2 gaps are ~1–10)
MAX_TIES = 4  # tie breaks followed along one path
MAX_REDECODES = 8  # greedy decodes edgelm runs again, in all, while following them
ALTERNATIVES = 3  # other tokens within the margin tried at one step


@dataclass
class GreedyPath:
    """edgelm's greedy tokens and, per step, the other tokens within TIE_MARGIN of the chosen one."""

    ids: list[int]
    ties: list[list[int]]
    tie_breaks: list[int] = field(default_factory=list)  # steps where this path took a near-tied token


def greedy_path(
    session: Any, prompt_ids: list[int], new_tokens: int, stop_ids: Collection[int], forced: list[int] = ()
) -> GreedyPath:
    """Greedy decoding of `new_tokens` after `prompt_ids`, the first `forced` tokens given, cut
    after the first stop token (a runtime's loop ends there)."""
    session.reset()
    ids, ties = list(forced), [[] for _ in forced]
    if ids and ids[-1] in stop_ids:
        return GreedyPath(ids, ties)
    logits = session.prefill(np.asarray(list(prompt_ids) + ids, dtype=np.int64))[-1]
    while len(ids) < new_tokens:
        best = int(np.argmax(logits))
        close = np.flatnonzero(logits >= logits[best] - TIE_MARGIN)
        ties.append([int(t) for t in close if t != best][:ALTERNATIVES])
        ids.append(best)
        if best in stop_ids or len(ids) == new_tokens:
            break
        logits = session.decode(best)
    return GreedyPath(ids, ties)


def follow_near_ties(
    first: GreedyPath, diverges: Callable[[list[int]], int | None], redecode: Callable[[list[int]], GreedyPath]
) -> GreedyPath | None:
    """The greedy path the vendor took, starting from `first` and taking near-tied tokens where
    `diverges(ids)` (the first step where the vendor's output leaves `ids`, None when it is all
    of it) says the vendor went elsewhere; None when no such path explains the vendor's output.
    `redecode(forced)` decodes greedily after the forced tokens."""
    budget = MAX_REDECODES
    stack = [first]
    while stack:
        path = stack.pop()
        step = diverges(path.ids)
        if step is None:
            return path
        if step >= len(path.ties) or len(path.tie_breaks) >= MAX_TIES:
            continue  # the vendor went on past edgelm's stop, or too many coin tosses to follow
        for alternative in reversed(path.ties[step]):
            if budget == 0:
                return None
            budget -= 1
            branch = redecode(path.ids[:step] + [alternative])
            branch.tie_breaks = [*path.tie_breaks, step]
            stack.append(branch)
    return None
