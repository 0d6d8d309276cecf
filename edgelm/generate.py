"""The one generation loop, shared by every runtime, the CLI and the profiler.

The profiler times exactly this loop, so the tokens/s it reports is what an app calling
`generate`/`stream` sees, not a number from a separate benchmark loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgelm.errors import PromptError
from edgelm.prefix_cache import CachedPrefix
from edgelm.sampling import SamplingConfig, sample_next
from edgelm.session import Session
from edgelm.tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:
    from edgelm.constrained import GrammarConstraint


@dataclass
class GeneratedToken:
    token_id: int
    text: str  # the new text this token completes (may be "" mid-character or near a stop string)
    seconds: float  # first token: prefill + sampling (TTFT); later: one decode step + sampling


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-n:]):
                best = max(best, n)
                break
    return best


def check_prompt_length(n_tokens: int, max_context: int) -> None:
    """Refuse an empty prompt, or one that leaves no room in the context, before any prefill."""
    if n_tokens == 0:
        raise PromptError("the prompt is empty (no tokens); give some text, or use the chat template")
    if n_tokens >= max_context:
        raise PromptError(
            f"the prompt is {n_tokens} tokens; this artifact's context holds {max_context} "
            "(prompt and generated tokens together): shorten it"
        )


def stream_tokens(
    session: Session,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    config: SamplingConfig,
    *,
    cache: CachedPrefix | None = None,
    constraint: GrammarConstraint | None = None,
) -> Iterator[GeneratedToken]:
    """Yield generated tokens one by one, with their text delta and step time.

    Stops at max_new_tokens, an EOS token (unless ignore_eos), a stop string (which is
    not emitted), the end of a `constraint`'s grammar, or the session's maximum context.
    `cache` (edgelm.prefix_cache) keeps what the session's cache holds across calls, so a
    prompt sharing a prefix with the last one continues from it; without one, every call
    starts from an empty cache.
    """
    check_prompt_length(len(prompt_ids), session.capabilities.max_context)
    rng = np.random.default_rng(config.seed)
    eos_ids = set() if config.ignore_eos else tokenizer.eos_token_ids
    max_context = session.capabilities.max_context
    cache = cache or CachedPrefix(session, reuse=False)
    seen = list(prompt_ids)
    decoder = IncrementalDecoder(tokenizer)
    text, emitted = "", 0
    started = time.perf_counter()
    logits = cache.start(prompt_ids)
    for step in range(config.max_new_tokens):
        if constraint is not None:
            logits = constraint.mask(logits)
        token_id = sample_next(logits, seen, config, rng)
        seconds = time.perf_counter() - started
        if token_id in eos_ids:
            break
        if constraint is not None:
            constraint.accept(token_id)
        seen.append(token_id)
        text += decoder.push(token_id)
        cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in config.stop) if i >= 0), default=-1)
        if cut >= 0:
            yield GeneratedToken(token_id, text[emitted:cut], seconds)
            return
        visible = len(text) - _held_back(text, config.stop)
        yield GeneratedToken(token_id, text[emitted:visible], seconds)
        emitted = max(emitted, visible)
        done = constraint is not None and constraint.finished
        if done or step + 1 == config.max_new_tokens or len(seen) >= max_context:
            break
        started = time.perf_counter()
        logits = cache.feed(token_id)
    text += decoder.flush()
    if emitted < len(text):
        yield GeneratedToken(-1, text[emitted:], 0.0)
