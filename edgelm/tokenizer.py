"""Tokenizer and chat template without transformers.

`tokenizers` reads tokenizer.json; the chat template runs in Jinja's immutable sandbox
(templates ship with models from strangers). Streaming text goes through
`IncrementalDecoder`, which holds back bytes until they form whole UTF-8 characters.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from edgelm.errors import TokenizerError, UnsupportedError
from edgelm.model import read_json_object, require_regular_file


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template refused the conversation: {message}")


class Tokenizer:
    """Encode/decode text and render the chat template, from a tokenizer/ folder."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        self.folder = folder
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"{folder}: no tokenizer.json; re-export the bundle or copy the model's tokenizer here"
            )
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({err})") from err
        config_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = (
            read_json_object(config_path, TokenizerError, "fix or remove it") if os.path.lexists(config_path) else {}
        )
        template_path = folder / "chat_template.jinja"
        template = self.config.get("chat_template")
        if os.path.lexists(template_path):
            if require_regular_file(template_path, TokenizerError) > MAX_TEMPLATE_BYTES:
                raise TokenizerError(f"{template_path}: larger than {MAX_TEMPLATE_BYTES >> 10} KB; not a chat template")
            try:
                template = template_path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as err:
                raise TokenizerError(f"{template_path}: not UTF-8 text ({err})") from err
        self.chat_template: str | None = template if isinstance(template, str) and template else None
        self.bos_token = self.special_token("bos_token")
        self.eos_token = self.special_token("eos_token")

    def special_token(self, key: str) -> str | None:
        """The special token's text; TokenizerError when tokenizer_config.json gives it as anything else."""
        value = self.config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(value, str):
            raise TokenizerError(
                f'tokenizer_config.json: {key} must be a string (or {{"content": ...}}), not {str(value)[:40]!r}'
            )
        return value

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
        """Token ids of `text`; TokenizerError for text that is not valid Unicode (lone surrogates,
        e.g. from invalid UTF-8 in a command line)."""
        if not isinstance(text, str):
            raise TokenizerError(f"expected text, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise TokenizerError(
                f"the text is not valid Unicode ({err.reason} at character {err.start}); pass UTF-8 text"
            ) from err
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render `messages` with the model's template; TokenizerError if it has none or it
        runs past its bounds (see BoundedTemplate). `tools` (OpenAI function definitions) are
        passed to a template that reads them; UnsupportedError for one that does not (they
        would be dropped without a word)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; pass raw text (chat=False)")
        extra: dict[str, Any] = {}
        if tools:
            if not self.template_reads("tools"):
                raise UnsupportedError("this model's chat template has no tool support: it would drop the tools")
            extra["tools"] = tools
        return BoundedTemplate(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )

    def template_reads(self, name: str) -> bool:
        """Whether the chat template reads the variable `name` (e.g. "tools")."""
        if not self.chat_template:
            return False
        from jinja2 import Environment, meta

        try:
            return name in meta.find_undeclared_variables(Environment().parse(self.chat_template))
        except Exception:  # noqa: BLE001 — a template jinja cannot parse reads nothing we can tell
            return False


MAX_TEMPLATE_BYTES = 256 << 10  # real chat templates are a few KB
MAX_TEMPLATE_OUTPUT = 16 << 20  # characters: far above any context window's worth of text
MAX_TEMPLATE_STEPS = 2_000_000  # Python line events while rendering (a real template needs thousands)
MAX_TEMPLATE_SECONDS = 5.0
MAX_REPEAT = 1 << 20  # longest string or list `*` and width-taking filters may build


class BoundedTemplate:
    """A chat template in Jinja's immutable sandbox, with every way to run long bounded.

    Templates ship with models from strangers. The sandbox stops attribute escapes; this
    adds what it does not bound: loop work (a tracer counts Python line events of the
    compiled template and stops at MAX_TEMPLATE_STEPS or MAX_TEMPLATE_SECONDS — this catches
    nested `range` loops with empty bodies too), output size, `*` / `**` on large operands,
    width arguments of `center`/`indent`/`wordwrap`/`format`, and recursion. Any of these,
    or a MemoryError / OverflowError inside, is a TokenizerError.
    """

    def __init__(self, source: str):
        from jinja2.exceptions import TemplateError

        self._env = _bounded_environment()
        try:
            self._template = self._env.from_string(source)
        except (TemplateError, RecursionError, MemoryError) as err:
            raise TokenizerError(f"chat template does not parse: {str(err)[:200]}") from err

    def render(self, **context: Any) -> str:
        from jinja2.exceptions import TemplateError

        steps = 0
        deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            nonlocal steps
            steps += 1
            if steps > MAX_TEMPLATE_STEPS or (steps & 1023 == 0 and time.monotonic() > deadline):
                raise _TemplateBudgetExceeded(f"ran past {MAX_TEMPLATE_STEPS} steps or {MAX_TEMPLATE_SECONDS:.0f} s")
            return tracer

        pieces: list[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise _TemplateBudgetExceeded(f"output passed {MAX_TEMPLATE_OUTPUT >> 20} M characters")
                pieces.append(piece)
        except TokenizerError:
            raise
        except _TemplateBudgetExceeded as err:
            raise TokenizerError(f"chat template refused: it {err}") from None
        except (
            TemplateError,
            RecursionError,
            MemoryError,
            OverflowError,
            ValueError,
            TypeError,
            ArithmeticError,
            LookupError,
            AttributeError,
        ) as err:
            raise TokenizerError(f"chat template failed to render ({type(err).__name__}: {str(err)[:200]})") from None
        finally:
            sys.settrace(previous)
        return "".join(pieces)


class _TemplateBudgetExceeded(Exception):
    """Raised from inside the render when a bound is reached (never escapes BoundedTemplate)."""


def _check_size(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_REPEAT:
        raise _TemplateBudgetExceeded(f"asked for a size of {value} (limit {MAX_REPEAT})")
    return value


def _bounded_environment() -> Any:
    import operator

    from jinja2 import filters
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
            if operator_name == "**":
                _check_size(right if isinstance(right, int) else 0)
                if isinstance(left, int) and abs(right) > 64 and abs(left) > 1:
                    raise _TemplateBudgetExceeded("raised a number to a power above 64")
                return operator.pow(left, right)
            if isinstance(left, (str, list, tuple)) and isinstance(right, int):
                _check_size(len(left) * right)
            if isinstance(right, (str, list, tuple)) and isinstance(left, int):
                _check_size(len(right) * left)
            return operator.mul(left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True)

    def bounded(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for value in (*args[1:], *kwargs.values()):
                _check_size(value)
            return fn(*args, **kwargs)

        return wrapper

    for name in ("center", "indent", "wordwrap", "truncate"):
        env.filters[name] = bounded(getattr(filters, f"do_{name}"))
    env.filters["format"] = lambda value, *args, **kwargs: _bounded_format(env, value, *args, **kwargs)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt)[:100])
    return env


def _bounded_format(env: Any, value: Any, *args: Any, **kwargs: Any) -> str:
    """`|format` with any width or precision in the format string bounded."""
    import re

    for number in re.findall(r"\d+", str(value)):
        if len(number) > 7 or int(number) > MAX_REPEAT:
            raise _TemplateBudgetExceeded(f"asked for a format width of {number[:20]}")
    from jinja2 import filters

    return filters.do_format(value, *args, **kwargs)


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
