"""Constrained decoding: only tokens that keep the output inside a grammar (a JSON schema, any
JSON object, a regular expression, a Lark grammar) may be sampled.

Built on llguidance (Microsoft's constrained-decoding engine, Rust, used by llama.cpp and
onnxruntime-genai): it reads the bundle's own tokenizer.json, so no transformers or torch are
needed, and it computes a token mask over a 150k vocabulary in well under a millisecond. The
mask is applied in edgelm.generate's shared loop, so every runtime gets it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import UnsupportedError

# JSON as json.dumps writes it: no free whitespace between tokens (a small model given the
# choice wanders into runs of newlines and tabs until max_tokens, the JSON never closed)
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as err:
        raise UnsupportedError(
            "constrained output needs llguidance: pip install 'edgelm[serve]' (or pip install llguidance)"
        ) from err
    return llguidance


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: Path, vocab_size: int, eos_ids: tuple[int, ...]) -> Any:
    """llguidance's view of the bundle's tokenizer (about a second to build: kept)."""
    llguidance = _llguidance()
    return llguidance.LLTokenizer(tokenizer_json.read_text(), n_vocab=vocab_size, eos_token=list(eos_ids))


class GrammarConstraint:
    """One generation's grammar state: mask the logits, then accept the sampled token."""

    def __init__(self, grammar: str, tokenizer_dir: Path, vocab_size: int, eos_ids: set[int]) -> None:
        llguidance = _llguidance()
        tokenizer = _tokenizer(Path(tokenizer_dir) / "tokenizer.json", vocab_size, tuple(sorted(eos_ids)))
        self.vocab_size = vocab_size
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise UnsupportedError(f"the output grammar is not valid: {self._matcher.get_error()[:300]}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any], tokenizer_dir: Path, vocab_size: int, eos_ids: set[int]):
        """Output that validates against `schema` (JSON Schema; llguidance's supported subset)."""
        llguidance = _llguidance()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT_JSON)
        except (ValueError, TypeError) as err:
            raise UnsupportedError(f"the JSON schema is not usable: {str(err)[:300]}") from err
        return cls(grammar, tokenizer_dir, vocab_size, eos_ids)

    @classmethod
    def json_object(cls, tokenizer_dir: Path, vocab_size: int, eos_ids: set[int]):
        """Any JSON object."""
        return cls.json_schema({"type": "object"}, tokenizer_dir, vocab_size, eos_ids)

    @classmethod
    def regex(cls, pattern: str, tokenizer_dir: Path, vocab_size: int, eos_ids: set[int]):
        """Output that matches the regular expression `pattern` as a whole."""
        return cls(_llguidance().LLMatcher.grammar_from_regex(pattern), tokenizer_dir, vocab_size, eos_ids)

    @classmethod
    def lark(cls, grammar: str, tokenizer_dir: Path, vocab_size: int, eos_ids: set[int]):
        """Output in the Lark grammar `grammar` (llguidance's dialect)."""
        return cls(_llguidance().LLMatcher.grammar_from_lark(grammar), tokenizer_dir, vocab_size, eos_ids)

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar allows next."""
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(words, bitorder="little")[: self.vocab_size].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` with every token the grammar forbids at -inf (a copy)."""
        allowed = self.allowed()
        n = min(len(allowed), logits.shape[-1])
        masked = np.full(logits.shape, -np.inf, dtype=np.float32)
        masked[:n][allowed[:n]] = logits[:n][allowed[:n]]
        return masked

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise UnsupportedError(f"token {token_id} leaves the output grammar ({self._matcher.get_error()[:200]})")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the caller stops)."""
        return self._matcher.is_stopped()
