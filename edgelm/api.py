"""`edgelm.load(...)`: open any artifact of a bundle and generate, stream or profile it.

A decoder bundle loads as a `LanguageModel` (generate, stream, session, profile); an
encoder bundle as a `TextEncoder` (embed or classify, profile).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.bundle import ArtifactEntry, Manifest, read_bundle
from edgelm.encoder_eval import (
    EncoderProfile,
    encoder_texts,
    profile_encoder,
    run_batched,
)
from edgelm.errors import BundleError, DeviceError, PromptError, UnsupportedError
from edgelm.generate import stream_tokens
from edgelm.profile import Profile, profile_session, timed
from edgelm.sampling import SamplingConfig
from edgelm.session import EncoderSession, Session, get_runtime
from edgelm.tokenizer import Tokenizer


class _Loaded:
    """What every loaded artifact carries: its session, tokenizer, manifest entry and load time."""

    def __init__(
        self,
        session: Any,
        tokenizer: Tokenizer,
        entry: ArtifactEntry,
        manifest: Manifest,
        load_s: float,
        threads: int | None,
    ):
        self._session = session
        self.tokenizer = tokenizer
        self.artifact = entry
        self.manifest = manifest
        self.load_s = load_s
        self.threads = threads

    def close(self) -> None:
        self._session.close()


class LanguageModel(_Loaded):
    """A loaded decoder artifact plus its tokenizer and generation defaults."""

    def _prompt_ids(self, prompt: str, chat: bool | None) -> list[int]:
        if not isinstance(prompt, str):
            raise PromptError(f"the prompt must be text, not {type(prompt).__name__}")
        use_chat = self.tokenizer.chat_template is not None if chat is None else chat
        if use_chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def _config(self, overrides: dict[str, Any]) -> SamplingConfig:
        return SamplingConfig.from_dict({**self.manifest.generation, **overrides})

    def stream(self, prompt: str, *, chat: bool | None = None, **sampling: Any) -> Iterator[str]:
        """Yield text pieces as they are generated (never a split UTF-8 character).

        chat=None applies the chat template when the model has one. Keyword arguments are
        SamplingConfig fields (max_new_tokens, temperature, top_k, top_p, ...).
        """
        ids = self._prompt_ids(prompt, chat)
        for token in stream_tokens(self._session, self.tokenizer, ids, self._config(sampling)):
            if token.text:
                yield token.text

    def generate(self, prompt: str, *, chat: bool | None = None, **sampling: Any) -> str:
        """Return the generated continuation of `prompt` as one string."""
        return "".join(self.stream(prompt, chat=chat, **sampling))

    def session(self) -> Session:
        """The low-level session: prefill(ids) -> logits[n, vocab], decode(id) -> logits[vocab]."""
        return self._session

    def profile(self, prompts: tuple[str, ...] | None = None, max_new_tokens: int = 128, repeats: int = 3) -> Profile:
        kwargs: dict[str, Any] = {"prompts": prompts} if prompts else {}
        return profile_session(
            self._session,
            self.tokenizer,
            max_new_tokens=max_new_tokens,
            repeats=repeats,
            load_s=self.load_s,
            file_bytes=self.artifact.bytes,
            threads=self.threads,
            **kwargs,
        )


class TextEncoder(_Loaded):
    """A loaded encoder artifact: sentence embeddings or text classification."""

    @property
    def task(self) -> str:
        return str(self.artifact.signature.get("task", self.manifest.source.get("task")))

    @property
    def labels(self) -> list[str]:
        """Class labels by id (classification models; empty for embedding models)."""
        return list(self.artifact.signature.get("labels", []))

    def _run(self, texts: str | Sequence[str], batch_size: int) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, int(self.artifact.signature.get("output_size", 0))), dtype=np.float32)
        limit = self._session.capabilities.max_context
        rows = [self.tokenizer.encode(t)[:limit] for t in texts]
        return run_batched(self._session, rows, batch=batch_size, pad_id=self.tokenizer.pad_token_id)

    def _require(self, task: str, method: str) -> None:
        if self.task != task:
            other = "classify" if method == "embed" else "embed"
            raise UnsupportedError(f"this bundle is a {self.task} model; use .{other}(), not .{method}()")

    def embed(self, texts: str | Sequence[str], batch_size: int = 8) -> np.ndarray:
        """float32 [len(texts), hidden]: mean-pooled, L2-normalised (dot product = cosine)."""
        self._require("feature-extraction", "embed")
        return self._run(texts, batch_size)

    def classify(self, texts: str | Sequence[str], batch_size: int = 8) -> list[dict[str, float]]:
        """One {label: probability} dict per text, most likely label first."""
        self._require("text-classification", "classify")
        logits = self._run(texts, batch_size).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        labels = self.labels or [str(i) for i in range(probs.shape[-1])]
        return [dict(sorted(zip(labels, map(float, p)), key=lambda kv: -kv[1])) for p in probs]

    def session(self) -> EncoderSession:
        """The low-level session: run(input_ids, attention_mask) -> [batch, size]."""
        return self._session

    def profile(self, text: str | None = None, runs: int = 20, batch: int = 8) -> EncoderProfile:
        """Latency at 128 tokens (p50/p90), throughput at `batch`, peak RSS (see encoder_eval)."""
        source = text or "\n\n".join(encoder_texts())
        return profile_encoder(
            self._session,
            self.tokenizer.encode(source),
            runs=runs,
            batch=batch,
            load_s=self.load_s,
            file_bytes=self.artifact.bytes,
            threads=self.threads,
        )


def load(
    path: str | Path, format: str | None = None, device: str = "cpu", threads: int | None = None, verify: bool = True
) -> LanguageModel | TextEncoder:
    """Open a bundle folder and one of its artifacts (by artifact name or format).

    Verifies every file's sha256 first (verify=False skips that). Raises BundleError for a
    bad bundle, UnsupportedError for a runtime that is not installed, DeviceError for a
    device the runtime cannot use (the message lists the ones it can).
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle folder; make one with `edgelm export -o {root}`")
    manifest = read_bundle(root, verify=verify)
    entry = manifest.artifact(format)
    runtime = get_runtime(entry.runtime)
    if device not in runtime.available_devices():
        raise DeviceError(
            f"runtime {runtime.name!r} cannot use device {device!r} here; available: "
            f"{', '.join(runtime.available_devices())} (see `edgelm doctor`)"
        )
    task = manifest.source.get("task", "text-generation")
    if not isinstance(task, str) or task not in TASK_KINDS:
        raise BundleError(f"manifest.json: unknown task {str(task)[:40]!r}; known: {', '.join(TASK_KINDS)}")
    tokenizer = Tokenizer(root / manifest.tokenizer["path"])
    session, load_s = timed(runtime.open, root / entry.path, device=device, threads=threads)
    kind, method = TASK_KINDS[task]
    if not hasattr(session, method):
        session.close()
        raise BundleError(
            f"manifest.json says {task}, but {entry.path} is not that kind of model; the manifest was "
            "edited — re-export the bundle"
        )
    return kind(session, tokenizer, entry, manifest, load_s, threads)


# task -> the class it loads as and the session method that kind of model has
TASK_KINDS: dict[str, tuple[type[_Loaded], str]] = {
    "text-generation": (LanguageModel, "prefill"),
    "feature-extraction": (TextEncoder, "run"),
    "text-classification": (TextEncoder, "run"),
}
