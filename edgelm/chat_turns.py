"""The model's chat template rendered once into plain strings, for apps without a Jinja engine.

A runtime that takes raw text (ExecuTorch's LlmModule, a llama.cpp JNI bridge) needs the
template's output around each message. Rendering it with sentinel contents and cutting at the
sentinels gives, for the turns a chat app sends: the text before the first user message (BOS
text, a default system prompt), the text after a user message up to where the assistant's
answer starts, and the text between an answer and the next user message. An app writes
`first_user_prefix + text + user_suffix` for turn one and `next_user_prefix + text + user_suffix`
for each later turn, keeping the runtime's cache instead of re-sending the history (the
answer's own end-of-turn token is the stop token the runtime ends on, not fed back, so it is
the start of next_user_prefix). A template whose output is not built that way (it
changes earlier turns when a later one is added) gets no turns: the manifest says so and an app
must render the whole conversation itself.
"""

from __future__ import annotations

from typing import Any

from edgelm.errors import TokenizerError
from edgelm.tokenizer import Tokenizer

SENTINELS = ("\ue000one\ue000", "\ue000two\ue000", "\ue000three\ue000")  # private-use characters: no template adds them


def chat_turns(tokenizer: Tokenizer) -> dict[str, Any]:
    """{"first_user_prefix", "user_suffix", "next_user_prefix", "bos_token"}, or {"unavailable": why}."""
    if not tokenizer.chat_template:
        return {"unavailable": "the tokenizer has no chat template: send raw text"}
    one, two, three = SENTINELS
    try:
        first = tokenizer.apply_chat_template([{"role": "user", "content": one}], add_generation_prompt=True)
        longer = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": one},
                {"role": "assistant", "content": two},
                {"role": "user", "content": three},
            ],
            add_generation_prompt=True,
        )
    except TokenizerError as err:
        return {"unavailable": f"the chat template did not render a plain user/assistant chat: {err}"}
    if first.count(one) != 1 or [longer.count(s) for s in SENTINELS] != [1, 1, 1]:
        return {"unavailable": "the chat template does not show each message once"}
    first_user_prefix, user_suffix = first.split(one)
    between_one_and_two, rest = longer.split(one)[1].split(two)
    next_user_prefix, tail = rest.split(three)
    if not longer.startswith(first_user_prefix + one) or between_one_and_two != user_suffix or tail != user_suffix:
        return {"unavailable": "the chat template renders a turn differently once later turns follow"}
    return {
        "first_user_prefix": first_user_prefix,
        "user_suffix": user_suffix,
        "next_user_prefix": next_user_prefix,
        "bos_token": tokenizer.bos_token or "",  # a runtime that adds BOS itself: drop it from first_user_prefix
    }
