"""Tokenizer and chat template without transformers.

`tokenizers` reads tokenizer.json; the chat template runs in Jinja's immutable sandbox
(templates ship with models from strangers). Streaming text goes through
`IncrementalDecoder`, which holds back bytes until they form whole UTF-8 characters.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from edgelm.errors import TokenizerError


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template refused the conversation: {message}")


class Tokenizer:
    """Encode/decode text and render the chat template, from a tokenizer/ folder."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json; re-export the bundle or copy the model's tokenizer here")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({err})") from err
        config_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = folder / "chat_template.jinja"
        template = template_path.read_text() if template_path.is_file() else self.config.get("chat_template")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.bos_token = self.special_token("bos_token")
        self.eos_token = self.special_token("eos_token")

    def special_token(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    @property
    def pad_token_id(self) -> int:
        """The id encoders pad batches with (masked out anyway): the pad token's, else 0."""
        pad = self.special_token("pad_token")
        found = self.token_to_id(pad) if pad else None
        return found if found is not None else 0

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_token_ids(self) -> set[int]:
        ids = {self.token_to_id(self.eos_token)} if self.eos_token else set()
        return {i for i in ids if i is not None}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's template; TokenizerError if it has none."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; pass raw text (chat=False)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as err:
            raise TokenizerError(f"chat template failed to render: {err}") from err


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a character.

    A byte-level token may hold half of a multi-byte character, which decodes to U+FFFD
    until the next token completes it; such a tail is held back. Only a short window of
    recent tokens is re-decoded each step (not the whole sequence), so the cost per token
    stays constant however long the generation runs.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window re-decoded for context (spaces, merges)
        self.read_offset = 0  # ids before this are already emitted

    def _window(self) -> tuple[str, str]:
        """(text already emitted from the window, text of the whole window)."""
        window = self.ids[self.prefix_offset :]
        emitted = self.tokenizer.decode(window[: self.read_offset - self.prefix_offset], self.skip_special_tokens)
        return emitted, self.tokenizer.decode(window, self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        emitted, text = self._window()
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        emitted, text = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted) :] if len(text) > len(emitted) else ""
