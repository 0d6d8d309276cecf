"""Off-grid twins: models that compute what the source computes but whose weights sit on no
quantization grid, to measure quantization on the hard case.

The default model's fp32 weights were dequantized from a Q4_1 GGUF, so every block of 32
already sits on a 4-bit grid and any block-32 4-bit recipe reproduces them almost exactly.
A user's own bf16 or fine-tuned checkpoint does not. Two twins stand in for it:

- `rescaled`: every scale group's input channels multiplied by log-uniform random factors
  in [1/strength, strength], the inverse folded into the producer (edgelm.scaling); the
  same function to float rounding, off every grid. strength 2 is close to a real
  checkpoint's channel spread, 4 is a hard case.
- `finetuned`: a few optimizer steps of next-token training on the calibration text, so the
  weights move a fraction of a grid step, as a short fine-tune does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgelm.scaling import rescale_randomly

TWIN_KINDS = ("rescaled", "finetuned")


def make_twin(
    model: Any, kind: str, strength: float = 2.0, seed: int = 0, steps: int = 30, train_ids: list[int] | None = None
) -> dict[str, Any]:
    """Turn `model` (fp32, in memory) into its twin in place; return what was done."""
    if kind == "rescaled":
        groups = rescale_randomly(model, 1 / strength, strength, seed)
        return {"twin": kind, "scale_range": [1 / strength, strength], "seed": seed, "groups": groups}
    if kind == "finetuned":
        return {"twin": kind, "seed": seed, **_finetune(model, train_ids or [], steps, seed)}
    raise ValueError(f"unknown twin kind {kind!r}; known: {', '.join(TWIN_KINDS)}")


def _finetune(model: Any, train_ids: list[int], steps: int, seed: int, lr: float = 3e-5) -> dict[str, Any]:
    import torch

    from edgelm.compress.measure import windows

    batches = windows(train_ids, 256, 256 * steps)
    if len(batches) < steps:
        raise ValueError(f"fine-tuning twin: {len(batches)} windows of calibration text, {steps} needed")
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for batch in batches[:steps]:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(float(loss), 4))
    model.eval()
    return {"steps": steps, "learning_rate": lr, "losses": [losses[0], losses[-1]]}


def save_twin(model: Any, tokenizer_dir: Path, folder: Path, record: dict[str, Any]) -> None:
    """Write the twin as a Hugging Face folder (config, safetensors, tokenizer, twin.json)."""
    folder.mkdir(parents=True, exist_ok=False)
    model.save_pretrained(folder, safe_serialization=True)
    for item in Path(tokenizer_dir).iterdir():
        if item.is_file():
            shutil.copyfile(item, folder / item.name)
    (folder / "twin.json").write_text(json.dumps(record, indent=2) + "\n")
