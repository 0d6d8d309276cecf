"""Random-weight models at the shapes people put on phones, built from configs (no download).

One row per published shape: the real layer count, widths, heads and vocabulary, so export
memory, file sizes and decode speed are what the real model's would be. The weights are
random (seeded), so parity is judged on logits (KL, top-1 agreement on confident positions,
max |diff|) — a random model's perplexity on English says nothing. The tokenizer is the
default model's (49,152 tokens); the rest of a larger vocabulary is rows no text reaches,
as in Qwen's padded 151,936-row table, and they still cost their bytes in every file.
`benchmarks/model_sizes.py` writes them and exports each with the android preset.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import EdgeLMError, UnsupportedError


@dataclass(frozen=True)
class ModelShape:
    name: str
    config_class: str  # a transformers config class
    model_class: str  # the transformers causal-LM class that config builds
    config: dict[str, Any] = field(default_factory=dict)
    published_parameters: str = ""  # as the model card says, for the reader's orientation

    def build_config(self, bos_id: int, eos_id: int) -> Any:
        import transformers

        return getattr(transformers, self.config_class)(
            **self.config, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id
        )


SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in [
        ModelShape(
            "qwen2.5-0.5b",
            "Qwen2Config",
            "Qwen2ForCausalLM",
            dict(
                vocab_size=151_936,
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                max_position_embeddings=32_768,
                rope_theta=1_000_000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                use_sliding_window=False,
            ),
            "494M",
        ),
        ModelShape(
            "llama-3.2-1b",
            "LlamaConfig",
            "LlamaForCausalLM",
            dict(
                vocab_size=128_256,
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=64,
                max_position_embeddings=131_072,
                rope_theta=500_000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
            ),
            "1.24B",
        ),
        ModelShape(
            "gemma-3-1b-like",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            dict(
                vocab_size=262_144,
                hidden_size=1152,
                intermediate_size=6912,
                num_hidden_layers=26,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=256,
                max_position_embeddings=32_768,
                sliding_window=512,
                rope_theta=1_000_000.0,
                rope_local_base_freq=10_000.0,
                query_pre_attn_scalar=256,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
            ),
            "1.0B",
        ),
    ]
}


def get_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise UnsupportedError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def write_shape(name: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Write a random-weight model of shape `name` as a Hugging Face folder (config,
    safetensors, the tokenizer files of `tokenizer_dir`, shape.json). Refuses a folder
    that exists: it never writes over what it did not make."""
    import torch
    import transformers

    from edgelm.tokenizer import Tokenizer

    shape = get_shape(name)
    if folder.exists():
        raise EdgeLMError(f"{folder} already exists; give a new folder for the model")
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > shape.config["vocab_size"]:
        raise EdgeLMError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than {name}'s vocabulary")
    bos = tokenizer.token_to_id(tokenizer.special_token("bos_token") or "") or 0
    eos = min(tokenizer.eos_token_ids or {0})
    torch.manual_seed(seed)
    model = getattr(transformers, shape.model_class)(shape.build_config(bos, eos)).eval()
    parameters = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    for item in Path(tokenizer_dir).iterdir():
        if item.is_file():
            shutil.copyfile(item, folder / item.name)
    record = {
        "shape": name,
        "published_parameters": shape.published_parameters,
        "parameters": parameters,
        "seed": seed,
        "weights": "random (transformers' own initialisation); judge parity on logits, not perplexity",
        "tokenizer": f"{tokenizer.vocab_size} tokens; vocabulary rows past them are never reached by text",
    }
    (folder / "shape.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
