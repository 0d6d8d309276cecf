"""How each architecture is written as GGUF: a small table per architecture.

A row says which llama.cpp architecture it becomes, which hyperparameters it writes
(GGUFWriter method → value from the transformers config), which tensors are left out,
and which tensors are rewritten into llama.cpp's conventions. Tensor *names* come from
the `gguf` package's own name map (gguf.get_tensor_name_map), not from a table here.

The rewrites, each what llama.cpp's own converter does:
- Llama: q/k rows are permuted from Hugging Face's rotate-half RoPE layout to the
  interleaved layout llama.cpp's "norm" RoPE reads.
- Gemma3: RMSNorm weights are stored as (1 + w), as Gemma computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelm.architectures import head_dim
from edgelm.errors import UnsupportedError

Config = Any
Transform = Callable[[str, np.ndarray, Config], np.ndarray]


def rope_theta(config: Config, layer_type: str = "full_attention") -> float:
    """RoPE base from transformers 5's rope_parameters (flat, or per layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check_rope(config: Config) -> None:
    params = getattr(config, "rope_parameters", None) or {}
    kinds = {p.get("rope_type", "default") for p in params.values() if isinstance(p, dict)} or {
        params.get("rope_type", "default")
    }
    unsupported = kinds - {"default"}
    if unsupported:
        raise UnsupportedError(
            f"the GGUF writer handles plain RoPE only; this model uses {', '.join(sorted(unsupported))} RoPE scaling"
        )


def _permute_rope_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face rotate-half rows → llama.cpp's interleaved pairs (per head)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama_rope_layout(name: str, data: np.ndarray, config: Config) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return _permute_rope_rows(data, config.num_attention_heads)
    if name.endswith("attn_k.weight"):
        return _permute_rope_rows(data, config.num_key_value_heads)
    return data


def gemma_norm_offset(name: str, data: np.ndarray, config: Config) -> np.ndarray:
    return data + 1 if name.endswith("norm.weight") else data


def _decoder_hparams(config: Config) -> list[tuple[str, Any]]:
    return [
        ("add_context_length", config.max_position_embeddings),
        ("add_embedding_length", config.hidden_size),
        ("add_block_count", config.num_hidden_layers),
        ("add_feed_forward_length", config.intermediate_size),
        ("add_head_count", config.num_attention_heads),
        ("add_head_count_kv", config.num_key_value_heads),
        ("add_layer_norm_rms_eps", config.rms_norm_eps),
        ("add_rope_freq_base", rope_theta(config)),
        ("add_vocab_size", config.vocab_size),
    ]


def _llama_hparams(config: Config) -> list[tuple[str, Any]]:
    explicit = []
    if (
        head_dim(config) * config.num_attention_heads != config.hidden_size
    ):  # e.g. after `edgelm compress --prune heads`
        explicit = [("add_key_length", head_dim(config)), ("add_value_length", head_dim(config))]
    return [*_decoder_hparams(config), ("add_rope_dimension_count", head_dim(config)), *explicit]


def _gemma3_hparams(config: Config) -> list[tuple[str, Any]]:
    # llama.cpp's gemma3 derives the attention scale from the head size and hard-codes its
    # sliding/global layer pattern; refuse checkpoints that differ rather than drift silently.
    if float(config.query_pre_attn_scalar) != float(head_dim(config)):
        raise UnsupportedError("the GGUF writer needs query_pre_attn_scalar == head_dim for Gemma3")
    layer_types = list(getattr(config, "layer_types", None) or [])
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if layer_types and layer_types != expected:
        raise UnsupportedError("the GGUF writer supports Gemma3's standard 5 local : 1 global layer pattern only")
    return [
        *_decoder_hparams(config),
        ("add_key_length", head_dim(config)),
        ("add_value_length", head_dim(config)),
        ("add_sliding_window", config.sliding_window),
        ("add_rope_freq_base_swa", rope_theta(config, "sliding_attention")),
    ]


def _bert_hparams(config: Config) -> list[tuple[str, Any]]:
    import gguf

    return [
        ("add_context_length", config.max_position_embeddings),
        ("add_embedding_length", config.hidden_size),
        ("add_block_count", config.num_hidden_layers),
        ("add_feed_forward_length", config.intermediate_size),
        ("add_head_count", config.num_attention_heads),
        ("add_layer_norm_eps", config.layer_norm_eps),
        ("add_causal_attention", False),
        ("add_pooling_type", gguf.PoolingType.MEAN),
        ("add_token_type_count", config.type_vocab_size),
        ("add_vocab_size", config.vocab_size),
    ]


@dataclass(frozen=True)
class GGUFArchitecture:
    """What the GGUF writer adds to an architecture's row (edgelm.architectures): llama.cpp's
    hyperparameter keys, tensor transforms, HF tensors it does not use."""

    hparams: Callable[[Config], list[tuple[str, Any]]]
    transform: Transform | None = None
    skip_prefixes: tuple[str, ...] = field(default=())  # HF tensors llama.cpp does not use


GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(_llama_hparams, llama_rope_layout),
    "qwen2": GGUFArchitecture(_decoder_hparams),
    "gemma3_text": GGUFArchitecture(_gemma3_hparams, gemma_norm_offset),
    "bert": GGUFArchitecture(_bert_hparams, skip_prefixes=("pooler.", "embeddings.position_ids")),
}


def gguf_architecture(model_type: str) -> GGUFArchitecture:
    if model_type not in GGUF_ARCHITECTURES:
        raise UnsupportedError(
            f"the GGUF writer does not handle {model_type!r}; it handles: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return GGUF_ARCHITECTURES[model_type]
