"""`edgelm.load(...)`: open any artifact of a bundle and generate, stream or profile it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgelm.bundle import ArtifactEntry, Manifest, read_bundle
from edgelm.errors import BundleError, DeviceError
from edgelm.generate import stream_tokens
from edgelm.profile import Profile, profile_session, timed
from edgelm.sampling import SamplingConfig
from edgelm.session import Session, get_runtime
from edgelm.tokenizer import Tokenizer


class LanguageModel:
    """A loaded artifact plus its tokenizer and generation defaults."""

    def __init__(self, session: Session, tokenizer: Tokenizer, entry: ArtifactEntry, manifest: Manifest,
                 load_s: float, threads: int | None):
        self._session = session
        self.tokenizer = tokenizer
        self.artifact = entry
        self.manifest = manifest
        self.load_s = load_s
        self.threads = threads

    def _prompt_ids(self, prompt: str, chat: bool | None) -> list[int]:
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
        return profile_session(self._session, self.tokenizer, max_new_tokens=max_new_tokens, repeats=repeats,
                               load_s=self.load_s, file_bytes=self.artifact.bytes, threads=self.threads, **kwargs)

    def close(self) -> None:
        self._session.close()


def load(path: str | Path, format: str | None = None, device: str = "cpu", threads: int | None = None,
         verify: bool = True) -> LanguageModel:
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
    tokenizer = Tokenizer(root / manifest.tokenizer["path"])
    session, load_s = timed(runtime.open, root / entry.path, device=device, threads=threads)
    return LanguageModel(session, tokenizer, entry, manifest, load_s, threads)
