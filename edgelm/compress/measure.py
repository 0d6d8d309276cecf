"""Perplexity of a torch model on token windows: the figure every compression step is judged by."""

from __future__ import annotations

import math
from typing import Any


def windows(ids: list[int], length: int, max_tokens: int | None = None) -> list[Any]:
    """Non-overlapping [1, length] id tensors over the first `max_tokens` ids (a short tail is dropped)."""
    import torch

    ids = ids[:max_tokens] if max_tokens else ids
    return [torch.tensor([ids[i : i + length]]) for i in range(0, len(ids) - length + 1, length)]


def mean_nll(model: Any, batches: list[Any]) -> float:
    """Mean next-token negative log-likelihood (nats) over every predicted position of `batches`."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += targets.numel()
    if not count:
        raise ValueError("no tokens to score: the text is shorter than one window")
    return total / count


def perplexity(model: Any, batches: list[Any]) -> float:
    return math.exp(mean_nll(model, batches))
