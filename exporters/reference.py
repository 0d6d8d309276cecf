"""The reference artifact: the source model in fp32 safetensors, run by the torch runtime.

It is what parity is measured against, kept in the bundle so that parity can be
re-measured later and so that a bundle always has one artifact that runs anywhere torch
does. Tied input/output embeddings are stored once (safetensors drops the alias).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelm.architectures import TASK_MODEL_CLASSES
from edgelm.exporter import ExportedArtifact, Exporter
from edgelm.model import SourceModel


class ReferenceExporter(Exporter):
    format = "safetensors"
    runtime = "torch"
    quants = ("fp32",)
    tasks = tuple(TASK_MODEL_CLASSES)  # every task edgelm knows
    requires = ("torch", "transformers", "safetensors")

    def export(self, model: Any, source: SourceModel, bundle_dir: Path, quant: str) -> ExportedArtifact:
        folder = bundle_dir / "reference"
        model.save_pretrained(str(folder), safe_serialization=True)
        files = sorted(p for p in folder.iterdir() if p.is_file())
        weights = folder / "model.safetensors"
        if source.task == "text-generation":
            signature = {
                "inputs": ["input_ids"],
                "outputs": ["logits"],
                "kv_cache": "transformers DynamicCache",
                "max_context": int(getattr(model.config, "max_position_embeddings", 0)),
            }
        else:
            from edgelm.encoder_graph import encoder_signature

            signature = encoder_signature(model.config, source.task).to_dict()
        return ExportedArtifact(
            path=weights,
            quant=quant,
            signature=signature,
            built_by="transformers save_pretrained",
            extra_files=[f for f in files if f != weights],
        )


EXPORTER = ReferenceExporter()
