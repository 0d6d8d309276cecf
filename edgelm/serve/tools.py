"""Tool calling: OpenAI tool definitions go into the model's own chat template, and the tool
calls the model writes come back out as `tool_calls`.

How a model writes a call is a property of its family, recognised from its chat template (one
row per convention). A template that does not read `tools` gets a 400 (the tools would be
dropped without a word); one that does, in a convention edgelm does not know, gets a 400 too.
`tool_choice` "required" or a named function constrains the output to a call (the JSON schema
of the allowed functions' parameters, through edgelm.constrained), so even a small model
answers with a well-formed call; "auto" lets the model choose and parses what it wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from edgelm.constrained import COMPACT_JSON
from edgelm.errors import UnsupportedError
from edgelm.tokenizer import Tokenizer


@dataclass(frozen=True)
class ToolCallFormat:
    """One family's way of writing a call: a JSON object {name, <arguments key>} between two
    strings (either may be empty)."""

    name: str
    template_marker: str  # a template containing this writes calls this way
    opening: str
    closing: str
    arguments_key: str

    def grammar(self, tools: list[dict[str, Any]]) -> str:
        """A Lark grammar (llguidance) for exactly one call of one of `tools`."""
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool["function"]["name"]},
                    self.arguments_key: tool["function"].get("parameters") or {"type": "object"},
                },
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            }
            for tool in tools
        ]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        schema = {**schema, "x-guidance": COMPACT_JSON}
        return f"start: {json.dumps(self.opening)} call {json.dumps(self.closing)}\ncall: %json {json.dumps(schema)}\n"

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(the text outside calls, the calls in OpenAI's shape) from what the model wrote."""
        if self.opening:
            pattern = re.compile(
                re.escape(self.opening.strip()) + r"\s*(\{.*?\})\s*" + re.escape(self.closing.strip()), re.S
            )
            found = [(m.span(), m.group(1)) for m in pattern.finditer(text)]
        else:
            stripped = text.strip()
            found = [((0, len(text)), stripped)] if stripped.startswith("{") else []
        calls, content, last = [], [], 0
        for (start, end), body in found:
            try:
                call = json.loads(body)
            except json.JSONDecodeError:
                continue
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                continue
            arguments = call.get(self.arguments_key, {})
            calls.append(
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(arguments)},
                }
            )
            content.append(text[last:start])
            last = end
        content.append(text[last:])
        return "".join(content).strip(), calls


FORMATS = (
    # Qwen2.5/Qwen3, Hermes, SmolLM3 and others: <tool_call>{"name": …, "arguments": …}</tool_call>
    ToolCallFormat("hermes", "<tool_call>", "<tool_call>\n", "\n</tool_call>", "arguments"),
    # Llama 3.1–3.3: a bare JSON object {"name": …, "parameters": …}
    ToolCallFormat("llama3-json", '"parameters"', "", "", "parameters"),
)


def tool_format(tokenizer: Tokenizer) -> ToolCallFormat:
    """The convention this model writes calls in; UnsupportedError when its template has no tools."""
    if not tokenizer.template_reads("tools"):
        raise UnsupportedError("this model's chat template has no tool support: it would drop the tools")
    for row in FORMATS:
        if row.template_marker in (tokenizer.chat_template or ""):
            return row
    raise UnsupportedError(
        "this model's chat template reads tools, but writes calls in a way edgelm does not know "
        f"(known: {', '.join(f.name for f in FORMATS)})"
    )


def chosen_tools(tools: list[dict[str, Any]], choice: str | dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
    """(the tools the model may call, whether it must call one) for OpenAI's tool_choice."""
    for tool in tools:
        if tool.get("type") != "function" or not isinstance((tool.get("function") or {}).get("name"), str):
            raise UnsupportedError("every tool must be {'type': 'function', 'function': {'name': ..., ...}}")
    if choice in (None, "auto"):
        return tools, False
    if choice == "none":
        return [], False
    if choice == "required":
        return tools, True
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        named = [t for t in tools if t["function"]["name"] == name]
        if not named:
            raise UnsupportedError(f"tool_choice names {str(name)[:60]!r}, which is not among the tools")
        return named, True
    raise UnsupportedError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', ...}")
