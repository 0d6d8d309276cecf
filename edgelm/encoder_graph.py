"""The export-friendly encoder step every graph format lowers (BERT-style encoders).

`(input_ids [batch, n], attention_mask [batch, n]) -> output`, dynamic batch and
sequence length up to the model's max positions. The output is what the task's users
consume, computed inside the graph so that every runtime returns the same thing:

- feature-extraction: `embeddings` [batch, hidden], the mean of the last hidden states
  over the unmasked tokens, L2-normalised (sentence-transformers' default pooling), so a
  dot product is a cosine similarity;
- text-classification: `logits` [batch, num_labels] from the checkpoint's own head.

Inputs are single-segment (token_type_ids are all zero inside the graph), which is what
embedding and classification apps send.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

OUTPUT_NAMES = {"feature-extraction": "embeddings", "text-classification": "logits"}
INPUT_NAMES = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class EncoderSignature:
    task: str
    output: str
    output_size: int  # hidden size (embeddings) or number of labels (logits)
    max_length: int
    pooling: str
    labels: list[str] = field(default_factory=list)  # id -> label, for classification

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "encoder",
            "inputs": list(INPUT_NAMES),
            "outputs": [self.output],
            "dynamic_axes": ["batch", "sequence"],
            **asdict(self),
        }


def encoder_signature(config: Any, task: str) -> EncoderSignature:
    if task == "text-classification":
        labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        return EncoderSignature(
            task,
            OUTPUT_NAMES[task],
            config.num_labels,
            config.max_position_embeddings,
            pooling="the checkpoint's classification head",
            labels=labels,
        )
    return EncoderSignature(
        task,
        OUTPUT_NAMES[task],
        config.hidden_size,
        config.max_position_embeddings,
        pooling="mean over attention_mask, L2-normalised",
    )


def mean_pool_normalized(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


class EncoderGraph(torch.nn.Module):
    """Wraps a transformers encoder (AutoModel or ...ForSequenceClassification) for export."""

    def __init__(self, model: Any, task: str):
        super().__init__()
        if task not in OUTPUT_NAMES:
            raise ValueError(f"encoder task {task!r}; known: {', '.join(OUTPUT_NAMES)}")
        self.model = model
        self.task = task
        self.signature = encoder_signature(model.config, task)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids))
        if self.task == "text-classification":
            return out.logits
        return mean_pool_normalized(out.last_hidden_state, attention_mask)


def example_encoder_inputs(batch: int = 2, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs for tracing: a padded row, so the mask path is exercised."""
    ids = torch.arange(batch * length, dtype=torch.long).reshape(batch, length) % 100 + 1
    mask = torch.ones_like(ids)
    mask[-1, length // 2 :] = 0
    return ids, mask
