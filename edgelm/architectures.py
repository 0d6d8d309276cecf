"""What edgelm knows about each model architecture, as data.

One row per Hugging Face `model_type`. Exporters and intake read this table; they never
re-encode per-architecture knowledge in if/else chains. Adding an architecture is adding
a row here (plus whatever a format needs in its own table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one producer's output, so their input channels can be rescaled
    without changing what the model computes: the consumers' weight columns are multiplied
    by a per-channel factor and the producer's output is divided by it.

    Paths are relative to one layer. `fold` says how the producer absorbs the division:
    "rmsnorm" (weight / s), "rmsnorm+1" (Gemma's (1 + weight) / s), "linear" (output rows
    and bias / s). `same_heads`: only fold when attention has as many KV heads as query
    heads (a grouped value head feeds several output-projection slices).
    """

    producer: str
    consumers: tuple[str, ...]
    fold: str
    same_heads: bool = False


LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "rmsnorm"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "rmsnorm"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear", same_heads=True),
)
GEMMA3_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "rmsnorm+1"),
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "rmsnorm+1"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear", same_heads=True),
)
PHI3_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "rmsnorm"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "rmsnorm"),
)
# Post-LayerNorm encoders: a LayerNorm's output is also the residual stream, so only the
# value → output projection pair can be rescaled without changing the function.
BERT_GROUPS = (ScaleGroup("attention.self.value", ("attention.output.dense",), "linear", same_heads=True),)


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json "model_type"
    family: str  # human name
    kind: str  # "decoder" (causal LM) or "encoder"
    gguf_arch: str  # llama.cpp's architecture name
    scale_groups: tuple[ScaleGroup, ...] = ()  # what activation-aware scaling may rescale (edgelm.scaling)
    # q/k/v and gate/up are separate Linears over one input each, which edgelm.fusion can fuse
    # (Phi-3's checkpoints come fused already)
    separate_projections: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in [
        Architecture("llama", "Llama", "decoder", "llama", LLAMA_GROUPS, separate_projections=True),
        Architecture("qwen2", "Qwen2", "decoder", "qwen2", LLAMA_GROUPS, separate_projections=True),
        Architecture("gemma3_text", "Gemma3", "decoder", "gemma3", GEMMA3_GROUPS, separate_projections=True),
        Architecture("phi3", "Phi-3", "decoder", "phi3", PHI3_GROUPS),
        Architecture("bert", "BERT-style encoder", "encoder", "bert", BERT_GROUPS),
    ]
}


# task -> the transformers Auto class that loads a model for it. A decoder is always
# text-generation; an encoder is text-classification when its checkpoint has a
# classification head (config.architectures says so), feature-extraction otherwise.
TASK_MODEL_CLASSES: dict[str, str] = {
    "text-generation": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
}


def task_for(arch: Architecture, config: dict[str, Any] | None = None) -> str:
    """The task a model of `arch` with this config.json serves (a TASK_MODEL_CLASSES key)."""
    if arch.kind == "decoder":
        return "text-generation"
    heads = (config or {}).get("architectures") or []
    return (
        "text-classification"
        if any(str(h).endswith("ForSequenceClassification") for h in heads)
        else "feature-extraction"
    )


def head_dim(config: Any) -> int:
    """Width of one attention head: the config's own head_dim where it sets one (Gemma3's is not
    hidden_size / heads), else hidden_size / heads."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def lookup_architecture(model_type: str | None, where: str) -> Architecture:
    """Return the row for `model_type`, or raise UnsupportedError naming what is supported."""
    from edgelm.errors import UnsupportedError

    if model_type not in ARCHITECTURES:
        raise UnsupportedError(
            f"{where}: architecture {model_type!r} is not supported; "
            f"supported model_type values: {', '.join(supported_model_types())}"
        )
    return ARCHITECTURES[model_type]
