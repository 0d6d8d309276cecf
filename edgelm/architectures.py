"""What edgelm knows about each model architecture, as data.

One row per Hugging Face `model_type`. Exporters and intake read this table; they never
re-encode per-architecture knowledge in if/else chains. Adding an architecture is adding
a row here (plus whatever a format needs in its own table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json "model_type"
    family: str  # human name
    kind: str  # "decoder" (causal LM) or "encoder"
    gguf_arch: str  # llama.cpp's architecture name


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in [
        Architecture("llama", "Llama", "decoder", "llama"),
        Architecture("qwen2", "Qwen2", "decoder", "qwen2"),
        Architecture("gemma3_text", "Gemma3", "decoder", "gemma3"),
        Architecture("phi3", "Phi-3", "decoder", "phi3"),
        Architecture("bert", "BERT-style encoder", "encoder", "bert"),
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
    return "text-classification" if any(str(h).endswith("ForSequenceClassification") for h in heads) \
        else "feature-extraction"


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
