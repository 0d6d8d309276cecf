"""Tokenizer without transformers: ids identical to transformers on the parity text."""

from __future__ import annotations

import pytest

from edgelm.errors import TokenizerError
from edgelm.parity import parity_text
from edgelm.tokenizer import IncrementalDecoder, Tokenizer


def test_token_ids_match_transformers_on_parity_text_tiny(tiny_llama):
    from transformers import AutoTokenizer

    text = parity_text()
    assert Tokenizer(tiny_llama).encode(text) == AutoTokenizer.from_pretrained(str(tiny_llama))(text)["input_ids"]


def test_token_ids_match_transformers_on_parity_text_smollm2(tmp_path):
    """The default model's tokenizer, read from its GGUF by transformers and saved as edgelm saves it."""
    from transformers import AutoTokenizer

    from edgelm.model import default_model_path

    gguf = default_model_path()
    reference = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    reference.save_pretrained(str(tmp_path))
    text = parity_text()
    ours = Tokenizer(tmp_path)
    assert ours.encode(text) == reference(text)["input_ids"]
    assert len(ours.encode(text)) > 4096
    messages = [{"role": "user", "content": "What is a KV cache?"}]
    assert ours.apply_chat_template(messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_chat_template_renders_in_sandbox(tiny_llama):
    text = Tokenizer(tiny_llama).apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_cannot_reach_python_internals(tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(tiny_llama, folder)
    tok = Tokenizer(folder)
    tok.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TokenizerError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_json_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


def test_incremental_decoder_never_splits_a_utf8_character(tiny_llama):
    tok = Tokenizer(tiny_llama)
    text = "naïve café — 日本語 ✓"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # some character spans several byte-level tokens, so at least one push was held back
    assert "" in pieces[:-1]
