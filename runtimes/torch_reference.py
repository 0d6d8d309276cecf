"""The torch reference runtime: transformers with its KV cache, fp32, CPU.

It runs the `safetensors` reference artifact of a bundle (or any model folder) and is
what every other format's parity is measured against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import DeviceError, InvalidModelError
from edgelm.session import Capabilities


class TorchSession:
    """A KV-cached causal LM session over an in-memory transformers model."""

    def __init__(self, model: Any, max_context: int | None = None):
        self.model = model
        config = model.config
        self.capabilities = Capabilities(
            max_context=int(max_context or getattr(config, "max_position_embeddings", 2048)),
            notes={"kv_cache": "transformers DynamicCache"},
        )
        self._cache: Any = None

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], past_key_values=self._cache, use_cache=True)
        return out.logits[0].float().numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._forward(np.asarray(ids, dtype=np.int64))

    def decode(self, token_id: int) -> np.ndarray:
        return self._forward(np.asarray([token_id], dtype=np.int64))[-1]

    def reset(self) -> None:
        self._cache = None

    def close(self) -> None:
        self._cache = None
        self.model = None


class TorchReferenceAdapter:
    name = "torch"

    def available_devices(self) -> tuple[str, ...]:
        return ("cpu",)

    def version(self) -> str:
        import torch
        import transformers

        return f"torch {torch.__version__}, transformers {transformers.__version__}"

    def open(self, path: Path, device: str = "cpu", threads: int | None = None) -> TorchSession:
        if device not in self.available_devices():
            raise DeviceError(f"the torch reference runtime runs on cpu only, not {device!r}; see `edgelm doctor`")
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        folder = Path(path)
        folder = folder if folder.is_dir() else folder.parent
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        except Exception as err:
            raise InvalidModelError(f"{folder}: the torch runtime could not load this model: {err}") from err
        return TorchSession(model.eval())


ADAPTER = TorchReferenceAdapter()
