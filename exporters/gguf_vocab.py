"""Tokenizer metadata for GGUF, from the bundle's tokenizer.json, checked against llama.cpp.

Two vocabulary kinds, as llama.cpp knows them:
- byte-level BPE (GPT-2 style: SmolLM, Qwen, Llama 3, ...) → the "gpt2" tokenizer:
  tokens, token types, merges;
- SentencePiece-style BPE (▁ for spaces, byte fallback to <0xXX>: Llama 2, Gemma, ...) →
  the "llama" (SPM) tokenizer: tokens, scores, token types. llama.cpp's SPM merges the
  adjacent pair whose result scores highest, so a token's score is minus the rank of the
  merge that makes it, which reproduces BPE's merge order.
Both carry the special ids and the chat template.

llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by a name in
the file. Rather than guess that name from the regex, edgelm writes a vocabulary-only
GGUF per candidate name, tokenizes the parity text plus a string of digits, accents,
CJK, emoji and odd whitespace with llama.cpp itself, and keeps the first name whose ids
are identical to the source tokenizer's. No match is an error, never a silent drift.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidModelError, TokenizerError, UnsupportedError
from edgelm.parity import parity_text
from edgelm.tokenizer import Tokenizer

# llama.cpp pre-tokenizer names, most common first (llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_*)
PRE_TOKENIZER_CANDIDATES = (
    "gpt-2",
    "smollm",
    "qwen2",
    "llama-bpe",
    "default",
    "starcoder",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "refact",
    "command-r",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "stablelm2",
    "gpt-4o",
    "tekken",
    "roberta-bpe",
)
PROBE_EXTRA = (
    "  Hello  world!\n\n\tTabs\t, numbers 1234567 3.14159 and 10,000; accents: héllo wörld "
    "naïve café; CJK 你好世界; emoji 🙂🚀; symbols <>{}[]()#@$%^&*_=+|\\/~`'\"  \n end"
)


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    special_ids: dict[str, int]  # bos / eos / pad / unk
    add_bos: bool
    chat_template: str | None
    merges: list[str] = field(default_factory=list)  # gpt2
    scores: list[float] = field(default_factory=list)  # llama (SPM)
    add_space_prefix: bool = False  # llama (SPM): text starts with ▁
    pre: str = "default"

    @property
    def pre_candidates(self) -> tuple[str, ...]:
        return PRE_TOKENIZER_CANDIDATES if self.model == "gpt2" else ("default",)  # SPM has no pre-tokenizer

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.scores:
            writer.add_token_scores(self.scores)
            writer.add_add_space_prefix(self.add_space_prefix)
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
    if model.get("type") != "BPE":
        raise UnsupportedError(
            f"the GGUF writer handles BPE vocabularies (byte-level or SentencePiece-style); this "
            f"tokenizer is {model.get('type')}"
        )
    spm = bool(model.get("byte_fallback"))
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    scores = {i: 0.0 for i in tokens}
    if spm:
        for i, text in tokens.items():
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                types[i] = gguf.TokenType.BYTE
        for rank, merge in enumerate(merges):
            made = model["vocab"].get(merge.replace(" ", "", 1))
            if made is not None and scores[made] == 0.0:
                scores[made] = -float(rank + 1)
        unk = model.get("unk_token")
        if unk in model["vocab"]:
            types[model["vocab"][unk]] = gguf.TokenType.UNKNOWN
    for added in data.get("added_tokens") or []:
        tokens[int(added["id"])] = added["content"]
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        types[int(added["id"])] = gguf.TokenType.UNKNOWN if added["content"] == model.get("unk_token") else kind
        scores[int(added["id"])] = 0.0
    size = max(vocab_size, max(tokens) + 1)
    for i in range(size):
        if i not in tokens:  # ids the model has rows for but the tokenizer never emits
            tokens[i], types[i], scores[i] = f"[PAD{i}]", gguf.TokenType.UNUSED, 0.0
    tok = Tokenizer(tokenizer_dir)
    specials = {key: tok.token_to_id(tok.special_token(f"{key}_token") or "") for key in ("bos", "eos", "pad", "unk")}
    plain, with_specials = tok.encode("a", add_special_tokens=False), tok.encode("a")
    normalizer = json.dumps(data.get("normalizer") or {})
    return GGUFVocab(
        model="llama" if spm else "gpt2",
        tokens=[tokens[i] for i in range(size)],
        token_types=[int(types[i]) for i in range(size)],
        special_ids={k: v for k, v in specials.items() if v is not None},
        add_bos=len(with_specials) > len(plain) and with_specials[0] == specials.get("bos"),
        chat_template=tok.chat_template,
        merges=[] if spm else merges,
        scores=[scores[i] for i in range(size)] if spm else [],
        add_space_prefix=spm and '"Prepend"' in normalizer,
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
        for name in vocab.pre_candidates:
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
        f"{tokenizer_dir}: none of llama.cpp's pre-tokenizers ({', '.join(vocab.pre_candidates)}) reproduces "
        "this tokenizer's ids on the parity text; a GGUF of it would tokenize differently, so none was written"
    )
