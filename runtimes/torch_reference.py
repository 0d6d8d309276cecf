"""The torch reference runtime: transformers with its KV cache, fp32, CPU.

It runs the `safetensors` reference artifact of a bundle (or any model folder) and is
what every other format's parity is measured against. Encoders run through
edgelm.encoder_graph, so the reference pools exactly as the exported graphs do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.architectures import TASK_MODEL_CLASSES, lookup_architecture, task_for
from edgelm.errors import DeviceError, InvalidModelError
from edgelm.model import read_json_object
from edgelm.session import Capabilities, token_ids


class TorchSession:
    """A KV-cached causal LM session over an in-memory transformers model."""

    def __init__(self, model: Any, max_context: int | None = None):
        self.model = model
        config = model.config
        self.capabilities = Capabilities(
            max_context=int(max_context or getattr(config, "max_position_embeddings", 2048)),
            notes={"kv_cache": "transformers DynamicCache"},
            vocab_size=getattr(config, "vocab_size", None),
        )
        self._cache: Any = None

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.as_tensor(ids, dtype=torch.long)[None], past_key_values=self._cache, use_cache=True
            )
        return out.logits[0].float().numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._forward(token_ids(ids, self.capabilities))

    def decode(self, token_id: int) -> np.ndarray:
        return self._forward(token_ids([token_id], self.capabilities))[-1]

    def reset(self) -> None:
        self._cache = None

    def truncate(self, length: int) -> None:
        if self._cache is None:
            return
        extra = self._cache.get_seq_length() - max(0, length)
        if extra > 0:
            self._cache.crop(-extra)  # transformers 5: a negative count removes that many from the end

    def close(self) -> None:
        self._cache = None
        self.model = None


class TorchEncoderSession:
    """An encoder run through edgelm.encoder_graph (the same pooling every format exports)."""

    def __init__(self, model: Any, task: str):
        from edgelm.encoder_graph import EncoderGraph

        self.graph = EncoderGraph(model, task).eval()
        self.capabilities = Capabilities(
            max_context=self.graph.signature.max_length, notes={"output": self.graph.signature.output}
        )

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.graph(
                torch.as_tensor(input_ids, dtype=torch.long), torch.as_tensor(attention_mask, dtype=torch.long)
            )
        return out.float().numpy()

    def close(self) -> None:
        self.graph = None


def reference_session(model: Any, task: str) -> TorchSession | TorchEncoderSession:
    """The fp32 reference session for an in-memory model serving `task`."""
    return TorchSession(model) if task == "text-generation" else TorchEncoderSession(model, task)


class TorchReferenceAdapter:
    name = "torch"

    def available_devices(self) -> tuple[str, ...]:
        return ("cpu",)

    def version(self) -> str:
        import torch
        import transformers

        return f"torch {torch.__version__}, transformers {transformers.__version__}"

    def open(self, path: Path, device: str = "cpu", threads: int | None = None) -> TorchSession | TorchEncoderSession:
        if device not in self.available_devices():
            raise DeviceError(f"the torch reference runtime runs on cpu only, not {device!r}; see `edgelm doctor`")
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        folder = Path(path)
        folder = folder if folder.is_dir() else folder.parent
        if not (folder / "config.json").is_file():
            raise InvalidModelError(f"{folder}: no config.json beside the weights; re-export the bundle")
        config = read_json_object(folder / "config.json", InvalidModelError, "re-export the bundle")
        task = task_for(lookup_architecture(config.get("model_type"), str(folder)), config)
        try:
            model = getattr(transformers, TASK_MODEL_CLASSES[task]).from_pretrained(str(folder), dtype=torch.float32)
        except Exception as err:
            raise InvalidModelError(f"{folder}: the torch runtime could not load this model: {err}") from err
        return reference_session(model.eval(), task)


ADAPTER = TorchReferenceAdapter()
