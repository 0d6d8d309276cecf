"""Tokenizer metadata for GGUF, from the bundle's tokenizer.json, checked against llama.cpp.

Byte-level BPE vocabularies (GPT-2 style: SmolLM, Qwen, Llama 3, ...) are written as
llama.cpp's "gpt2" tokenizer: tokens, token types, merges, special ids, chat template.

llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by a name in
the file. Rather than guess that name from the regex, edgelm writes a vocabulary-only
GGUF per candidate name, tokenizes the parity text plus a string of digits, accents,
CJK, emoji and odd whitespace with llama.cpp itself, and keeps the first name whose ids
are identical to the source tokenizer's. No match is an error, never a silent drift.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidModelError, TokenizerError, UnsupportedError
from edgelm.parity import parity_text
from edgelm.tokenizer import Tokenizer

# llama.cpp pre-tokenizer names, most common first (llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_*)
PRE_TOKENIZER_CANDIDATES = (
    "gpt-2", "smollm", "qwen2", "llama-bpe", "default", "starcoder", "deepseek-llm", "deepseek-coder", "falcon",
    "refact", "command-r", "olmo", "dbrx", "smaug-bpe", "stablelm2", "gpt-4o", "tekken", "roberta-bpe",
)
PROBE_EXTRA = ("  Hello  world!\n\n\tTabs\t, numbers 1234567 3.14159 and 10,000; accents: héllo wörld "
               "naïve café; CJK 你好世界; emoji 🙂🚀; symbols <>{}[]()#@$%^&*_=+|\\/~`'\"  \n end")


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / pad / unk
    add_bos: bool
    chat_template: str | None
    pre: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for key, token_id in self.special_ids.items():
            getattr(writer, f"add_{key}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocab(tokenizer_dir: Path, vocab_size: int) -> GGUFVocab:
    """Build GGUF tokenizer metadata from tokenizer.json (padded to the model's vocab size)."""
    import gguf

    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte fallback)" if model.get("byte_fallback") else model.get("type")
        raise UnsupportedError(f"the GGUF writer handles byte-level BPE vocabularies; this tokenizer is {kind}")
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in data.get("added_tokens") or []:
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(tokens) + 1)
    for i in range(size):
        if i not in tokens:  # ids the model has rows for but the tokenizer never emits
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tok = Tokenizer(tokenizer_dir)
    specials = {key: tok.token_to_id(tok.special_token(f"{key}_token") or "") for key in ("bos", "eos", "pad", "unk")}
    plain, with_specials = tok.encode("a", add_special_tokens=False), tok.encode("a")
    return GGUFVocab(
        model="gpt2", tokens=[tokens[i] for i in range(size)], token_types=[int(types[i]) for i in range(size)],
        merges=merges, special_ids={k: v for k, v in specials.items() if v is not None},
        add_bos=len(with_specials) > len(plain) and with_specials[0] == specials.get("bos"),
        chat_template=tok.chat_template,
    )


def probe_text() -> str:
    return parity_text() + "\n\n" + PROBE_EXTRA


def choose_pre_tokenizer(vocab: GGUFVocab, tokenizer_dir: Path, arch: str) -> str:
    """The llama.cpp pre-tokenizer name whose tokenization equals the source tokenizer's."""
    import gguf

    from edgelm.runtimes.llamacpp import tokenize_with_vocab_file

    text = probe_text()
    expected = Tokenizer(tokenizer_dir).encode(text, add_special_tokens=False)
    with tempfile.TemporaryDirectory() as tmp:
        for name in PRE_TOKENIZER_CANDIDATES:
            vocab.pre = name
            path = Path(tmp) / f"vocab-{name}.gguf"
            writer = gguf.GGUFWriter(str(path), arch)
            vocab.write(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.close()
            try:
                ids = tokenize_with_vocab_file(path, text)
            except InvalidModelError:  # a name this llama.cpp build does not know
                continue
            if ids == expected:
                return name
    raise TokenizerError(
        f"{tokenizer_dir}: none of llama.cpp's pre-tokenizers ({', '.join(PRE_TOKENIZER_CANDIDATES)}) reproduces "
        "this tokenizer's ids on the parity text; a GGUF of it would tokenize differently, so none was written"
    )
