"""How an export measures each artifact: parity against the fp32 reference, then a profile.

Decoders and encoders are measured differently (perplexity and decode tok/s; output cosine
and latency/throughput), so each kind has one evaluation class and export_bundle picks it
from `EVALUATIONS` by the source model's task — the pipeline itself has no branches on it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from edgelm.encoder_eval import encoder_texts, measure_encoder_parity, profile_encoder
from edgelm.parity import measure_parity, parity_text
from edgelm.profile import profile_session
from edgelm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from edgelm.export import ExportOptions

EXPORT_RSS_SCOPE = "measured in the export process, which also holds the fp32 torch reference"


class DecoderEvaluation:
    """Perplexity, top-1, KL and greedy agreement on the parity text; decode profile."""

    def __init__(self, tokenizer: Tokenizer, options: ExportOptions, task: str):
        self.tokenizer, self.options = tokenizer, options
        self.text = parity_text()
        self.ids = tokenizer.encode(self.text)[: options.parity.max_tokens]

    def describe(self) -> dict[str, Any]:
        settings = self.options.parity
        return {
            "description": f"pydoc_data.topics (first 40,000 chars), first {len(self.ids)} tokens, "
            f"windows of {settings.window} every {settings.stride}",
            "tokens": len(self.ids),
            "window": settings.window,
            "stride": settings.stride,
            "sha256_of_text": hashlib.sha256(self.text.encode()).hexdigest(),
        }

    def parity(self, session: Any, reference: Any, quant: str) -> tuple[dict[str, Any], str | None]:
        """Parity on the parity text: (its record, why the gate failed or None)."""
        options = self.options
        parity = measure_parity(
            session,
            reference,
            self.ids,
            options.gates.get(quant, options.gates["fp32"]),
            options.parity,
            max_kl=options.kl_gates.get(quant),
            min_confident_top1=options.top1_gates.get(quant),
        )
        return parity.to_dict(), parity.failure()

    def profile(self, session: Any, load_s: float, file_bytes: int) -> dict[str, Any]:
        """The decode profile; the caller makes sure nothing else runs meanwhile."""
        return profile_session(
            session,
            self.tokenizer,
            max_new_tokens=self.options.profile_new_tokens,
            repeats=self.options.profile_repeats,
            load_s=load_s,
            file_bytes=file_bytes,
            threads=self.options.threads,
            rss_scope=EXPORT_RSS_SCOPE,
        ).to_dict()


class EncoderEvaluation:
    """Output cosine against the reference on real paragraphs; latency and batch throughput."""

    def __init__(self, tokenizer: Tokenizer, options: ExportOptions, task: str):
        self.tokenizer, self.options, self.task = tokenizer, options, task
        self.texts = encoder_texts()
        self.rows = [tokenizer.encode(t) for t in self.texts]

    def _truncated(self, max_length: int) -> list[list[int]]:
        return [row[:max_length] for row in self.rows]

    def describe(self) -> dict[str, Any]:
        return {
            "description": f"the first {len(self.texts)} paragraphs of pydoc_data.topics, in padded batches of 8",
            "texts": len(self.texts),
            "tokens": sum(len(r) for r in self.rows),
            "sha256_of_text": hashlib.sha256("\n\n".join(self.texts).encode()).hexdigest(),
        }

    def parity(self, session: Any, reference: Any, quant: str) -> tuple[dict[str, Any], str | None]:
        """Output cosine against the reference: (its record, why the gate failed or None)."""
        gate = self.options.encoder_gates.get(quant, self.options.encoder_gates["fp32"])
        rows = self._truncated(session.capabilities.max_context)
        parity = measure_encoder_parity(session, reference, rows, self.task, gate, pad_id=self.tokenizer.pad_token_id)
        return parity.to_dict(), None if parity.passed else f"min cosine {parity.min_cosine:.5f} < gate {gate}"

    def profile(self, session: Any, load_s: float, file_bytes: int) -> dict[str, Any]:
        """Latency and batch throughput; the caller makes sure nothing else runs meanwhile."""
        return profile_encoder(
            session,
            [i for row in self.rows for i in row],
            load_s=load_s,
            file_bytes=file_bytes,
            threads=self.options.threads,
            rss_scope=EXPORT_RSS_SCOPE,
        ).to_dict()


EVALUATIONS: dict[str, type[DecoderEvaluation] | type[EncoderEvaluation]] = {
    "text-generation": DecoderEvaluation,
    "feature-extraction": EncoderEvaluation,
    "text-classification": EncoderEvaluation,
}
