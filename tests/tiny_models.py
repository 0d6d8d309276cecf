"""Tiny random models built from configs, saved as Hugging Face folders with a tokenizer.

Small enough to export, measure and profile in seconds. The tokenizer is a byte-level BPE
trained on the parity text, so real text tokenizes to realistic ids.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384


@lru_cache(maxsize=2)
def _tokenizer_json(ascii_only: bool = False) -> str:
    """ascii_only: no tokens for the bytes 0x80-0xFF (characters outside ASCII are dropped), so
    every token decodes to valid text on its own, as a vendor runner's per-token callback needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgelm.parity import parity_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if ascii_only:
        alphabet = [c for c in alphabet if c.encode() in _ascii_byte_symbols()]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet)
    text = parity_text()[:20000]
    tok.train_from_iterator([text.encode("ascii", "ignore").decode() if ascii_only else text], trainer)
    return tok.to_str()


def _ascii_byte_symbols() -> set[bytes]:
    """The ByteLevel pre-tokenizer's symbols for the bytes 0x00-0x7F."""
    from tokenizers import pre_tokenizers

    symbols = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(
        "".join(chr(b) for b in range(128))
    )
    return {c.encode() for c in symbols[0][0]}


SPM_VOCAB_SIZE = 640


@lru_cache(maxsize=1)
def _sentencepiece_style_tokenizer_json() -> str:
    """A Llama-2 / Gemma style tokenizer: ▁ for spaces, BPE merges, byte fallback to <0xXX>."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
        trainers,
    )

    from edgelm.parity import parity_text

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=SPM_VOCAB_SIZE, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)]
    )
    tok.train_from_iterator([parity_text()[:20000]], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    data = json.loads(tok.to_str())  # byte tokens are ordinary vocabulary entries, not added special tokens
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in specials]
    return json.dumps(data)


def write_tokenizer(folder: Path, sentencepiece_style: bool = False, ascii_only: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if sentencepiece_style:
        (folder / "tokenizer.json").write_text(_sentencepiece_style_tokenizer_json())
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                }
            )
        )
        return
    (folder / "tokenizer.json").write_text(_tokenizer_json(ascii_only))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|im_end|>",
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )


def _decoder_common() -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=2,
    )


def tiny_config(kind: str):
    import transformers

    if kind == "llama":
        return transformers.LlamaConfig(**_decoder_common(), tie_word_embeddings=True)
    if kind == "llama-spm":  # with a SentencePiece-style (byte-fallback BPE) vocabulary
        return transformers.LlamaConfig(**{**_decoder_common(), "vocab_size": SPM_VOCAB_SIZE, "bos_token_id": 1})
    if kind == "qwen2":
        return transformers.Qwen2Config(**_decoder_common(), tie_word_embeddings=False)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(
            **_decoder_common(), head_dim=8, sliding_window=16, query_pre_attn_scalar=8
        )
    # 16-wide heads, as onnxruntime's attention node needs to apply RoPE itself (real models' are 64-256)
    if kind == "llama-h16":
        return transformers.LlamaConfig(**{**_decoder_common(), "hidden_size": 64}, tie_word_embeddings=True)
    if kind == "gemma3-h16":  # head_dim other than hidden / heads, as in Gemma 3 1B (256 against 1152 / 4 = 288)
        return transformers.Gemma3TextConfig(
            **_decoder_common(), head_dim=16, sliding_window=16, query_pre_attn_scalar=16
        )
    if kind == "phi3":  # half-rotary and a sliding window shorter than the tests' 40 tokens
        return transformers.Phi3Config(
            **_decoder_common(), partial_rotary_factor=0.5, sliding_window=16, tie_word_embeddings=False
        )
    encoder = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    if kind == "bert":
        return transformers.BertConfig(**encoder)
    if kind == "bert-cls":  # with a 3-way classification head
        return transformers.BertConfig(
            **encoder,
            id2label={0: "negative", 1: "neutral", 2: "positive"},
            architectures=["BertForSequenceClassification"],
        )
    raise ValueError(kind)


MODEL_CLASSES = {"bert": "AutoModel", "bert-cls": "AutoModelForSequenceClassification"}  # others: causal LM


def build_tiny_model(
    kind: str,
    folder: Path,
    seed: int = 0,
    layers: int | None = None,
    initializer_range: float | None = None,
    ascii_vocab: bool = False,
) -> Path:
    """Save a random `kind` model (llama, qwen2, gemma3, phi3, bert, bert-cls) with a tokenizer into `folder`.

    `layers` overrides the 2 layers every kind has (the compression tests drop some).
    `initializer_range` 0.2 (instead of 0.02) gives a model whose greedy continuation varies
    from token to token, where the default repeats one token: what the vendor-runtime
    comparisons need to mean something; `ascii_vocab` gives it a tokenizer without lone
    non-ASCII bytes (see _tokenizer_json).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(kind)
    if layers is not None:
        config = type(config)(**{**config.to_dict(), "num_hidden_layers": layers, "layer_types": None})
    if initializer_range is not None:
        config.initializer_range = initializer_range
    model_class = getattr(transformers, MODEL_CLASSES.get(kind, "AutoModelForCausalLM"))
    model = model_class.from_config(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer(folder, sentencepiece_style=kind.endswith("-spm"), ascii_only=ascii_vocab)
    return folder
