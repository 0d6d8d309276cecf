"""OpenAI request bodies, checked, and mapped onto edgelm's sampling settings.

Parameters edgelm cannot honour are refused with a 400 that says so, never silently ignored:
n > 1, logprobs, frequency/presence penalties (OpenAI's are additive; edgelm's
`repetition_penalty`, accepted as an extension like `top_k`, is multiplicative — a different
curve), echo and suffix on completions.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgelm.errors import UnsupportedError


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown parameter is refused, not dropped


class Message(BaseModel):
    # a previous answer's message sent back as is carries refusal/annotations/audio: accepted, unused
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: text content; a tool call's arguments as an
        object (templates print them with tojson); "developer" as "system"."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        message["content"] = _text(self.content)
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [_call_for_template(call) for call in self.tool_calls]
        return message


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise UnsupportedError(
                f"content parts of type {str(part.get('type'))[:30]!r} are not supported (text only)"
            )
        parts.append(part["text"])
    return "".join(parts)


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise UnsupportedError(f"tool call arguments are not JSON ({err.msg})") from None
    return {"type": "function", "id": call.get("id"), "function": function}


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | int | None = None
    user: str | None = None
    # extensions (as vLLM and llama-server accept them through the client's extra_body)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = None  # generate max_tokens whatever the model says (benchmarks)
    regex: str | None = None  # the output must match this regular expression
    grammar: str | None = None  # the output must follow this Lark grammar (llguidance's dialect)

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise UnsupportedError("n > 1 is not supported: send one request per completion")
        if self.frequency_penalty or self.presence_penalty:
            raise UnsupportedError(
                "frequency_penalty and presence_penalty are not supported; edgelm's repetition_penalty "
                "(a multiplicative penalty, e.g. 1.1) can be sent instead"
            )
        if self.logprobs:
            raise UnsupportedError("logprobs are not supported")

    def sampling(self, defaults: dict[str, Any], max_tokens: int | None = None) -> dict[str, Any]:
        """SamplingConfig fields: the bundle's defaults, then what the request sets."""
        settings = dict(defaults)
        chosen = {
            "max_new_tokens": max_tokens if max_tokens is not None else self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }
        settings.update({k: v for k, v in chosen.items() if v is not None})
        if self.stop is not None:
            settings["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return settings


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def sampling(self, defaults: dict[str, Any], max_tokens: int | None = None) -> dict[str, Any]:
        return super().sampling(defaults, self.max_completion_tokens if max_tokens is None else max_tokens)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def text(self) -> str:
        if self.echo or self.suffix:
            raise UnsupportedError("echo and suffix are not supported")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise UnsupportedError("send one prompt per request (a list of several is not supported)")
            return self.prompt[0]
        return self.prompt


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
