"""onnxruntime adapter for edgelm's decoder and encoder graphs (edgelm.graph, edgelm.encoder_graph).

The KV cache never round-trips through numpy: present_* outputs are kept as OrtValues and
fed back as the next step's past_* inputs, so only the logits are copied out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgelm.errors import DeviceError, InvalidModelError
from edgelm.session import Capabilities, model_failures, token_ids

# device -> execution providers to try, in order of preference
DEVICE_PROVIDERS = {
    "cpu": ("XnnpackExecutionProvider", "CPUExecutionProvider"),
    "gpu": ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider"),
    "npu": ("QNNExecutionProvider", "NnapiExecutionProvider"),
}


def load_onnx_graph(path: Path) -> object:
    """The ModelProto without its external data; InvalidModelError for anything that is not a
    model with a graph (protobuf parses an empty or foreign file as an empty model)."""
    import onnx

    from edgelm.model import require_regular_file

    require_regular_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise InvalidModelError(f"{path}: not a readable ONNX model ({str(err)[:300]}); re-export it") from err
    if not proto.graph.node or not proto.graph.output or not proto.opset_import:
        raise InvalidModelError(f"{path}: not an ONNX model (no graph nodes, outputs or opset); re-export it")
    return proto


def check_external_data_stays_inside(path: Path) -> None:
    """Refuse a model whose external-data locations point outside its own folder."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    proto = load_onnx_graph(path)
    root = path.parent.resolve()
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            location = (root / ExternalDataInfo(tensor).location).resolve()
            if root not in location.parents:
                raise InvalidModelError(
                    f"{path}: tensor {tensor.name!r} reads external data from {location}, outside the model's folder; "
                    "refusing to load it (a bundle must be self-contained)"
                )


def _max_context(metadata: str, path: Path) -> int:
    """The context length edgelm wrote into the model's metadata (2048 if absent)."""
    try:
        value = json.loads(metadata).get("max_context", 2048)
    except (ValueError, RecursionError, AttributeError) as err:
        raise InvalidModelError(f"{path}: its edgelm metadata is not a JSON object ({type(err).__name__})") from err
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 24:
        raise InvalidModelError(f"{path}: its edgelm metadata gives max_context {str(value)[:40]!r}")
    return value


class OnnxSession:
    def __init__(self, session: object, max_context: int, provider: str):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_")]
        self.present_names = [o.name for o in session.get_outputs() if o.name.startswith("present_")]
        shape = inputs[self.past_names[0]].shape  # [1, kv_heads, past_len, head_dim]
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, int(shape[1]), 0, int(shape[3])), dtype=np.float32))
        self._empty = [empty] * len(self.past_names)
        self.output_names = ["logits", *self.present_names]
        self.takes_mask = "attention_mask" in inputs  # GroupQueryAttention graphs read positions off it
        vocab = next((o.shape[-1] for o in session.get_outputs() if o.name == "logits"), None)
        self.capabilities = Capabilities(
            max_context=max_context,
            vocab_size=vocab if isinstance(vocab, int) else None,
            notes={"provider": provider, "kv_cache": "OrtValues kept in onnxruntime between steps"},
        )
        self._past: list[object] | None = None

    def _run(self, ids: np.ndarray) -> np.ndarray:
        ort_value = self._ort.OrtValue.ortvalue_from_numpy
        ids = np.ascontiguousarray(ids.reshape(1, -1), dtype=np.int64)
        feeds = {"input_ids": ort_value(ids)}
        if self.takes_mask:  # past + new positions; the past length is the cached keys' own
            cached = self._past[0].shape()[2] if self._past is not None else 0
            feeds["attention_mask"] = ort_value(np.ones((1, cached + ids.shape[1]), dtype=np.int64))
        feeds.update(zip(self.past_names, self._past if self._past is not None else self._empty))
        # One call with OrtValues in and out: the cache stays in onnxruntime's memory, and no
        # per-tensor Python binding calls are made (~120 of them per token for 30 layers).
        with model_failures("onnxruntime", (Exception,)):  # its errors derive from Exception only
            outputs = self.session.run_with_ort_values(self.output_names, feeds)
        self._past = outputs[1:]
        return outputs[0].numpy()[0]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._run(token_ids(ids, self.capabilities))

    def decode(self, token_id: int) -> np.ndarray:
        return self._run(token_ids([token_id], self.capabilities))[-1]

    def reset(self) -> None:
        self._past = None

    def truncate(self, length: int) -> None:
        """The cached keys and values cut to `length` positions (one copy of the cache)."""
        if self._past is None or length >= self._past[0].shape()[2]:
            return
        if length <= 0:
            self._past = None
            return
        ort_value = self._ort.OrtValue.ortvalue_from_numpy
        self._past = [ort_value(np.ascontiguousarray(past.numpy()[:, :, :length])) for past in self._past]

    def close(self) -> None:
        self._past = None
        self.session = None


class OnnxEncoderSession:
    """An encoder graph (edgelm.encoder_graph): a padded batch in, one vector per row out."""

    def __init__(self, session: object, max_length: int, provider: str):
        self.session = session
        self.output_names = [session.get_outputs()[0].name]
        self.capabilities = Capabilities(
            max_context=max_length, notes={"provider": provider, "output": self.output_names[0]}
        )

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        with model_failures("onnxruntime", (Exception,)):
            return self.session.run(self.output_names, feeds)[0]

    def close(self) -> None:
        self.session = None


class OnnxRuntimeAdapter:
    name = "onnxruntime"

    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def available_devices(self) -> tuple[str, ...]:
        import onnxruntime as ort

        present = set(ort.get_available_providers())
        return tuple(d for d, providers in DEVICE_PROVIDERS.items() if present & set(providers))

    def open(self, path: Path, device: str = "cpu", threads: int | None = None) -> OnnxSession | OnnxEncoderSession:
        import onnxruntime as ort

        path = Path(path)
        present = ort.get_available_providers()
        providers = [p for p in DEVICE_PROVIDERS.get(device, ()) if p in present]
        if not providers:
            raise DeviceError(
                f"onnxruntime has no execution provider for {device!r} here; available: "
                f"{', '.join(present)} (see `edgelm doctor`)"
            )
        check_external_data_stays_inside(path)
        options = ort.SessionOptions()
        # The stored file is already optimized offline; extended/layout passes are CPU-specific
        # and cheap, so they run at load.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        if providers[-1] != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:
            raise InvalidModelError(f"{path}: onnxruntime could not load it ({err}); re-export it") from err
        meta = session.get_modelmeta().custom_metadata_map
        max_context = _max_context(meta.get("edgelm", "{}"), path)
        inputs = {i.name for i in session.get_inputs()}
        if any(name.startswith("past_") for name in inputs):  # a decoder (its attention mask, if any, beside)
            return OnnxSession(session, max_context, session.get_providers()[0])
        if "attention_mask" in inputs:
            return OnnxEncoderSession(session, max_context, session.get_providers()[0])
        raise InvalidModelError(
            f"{path}: inputs {sorted(inputs)} are neither edgelm's decoder graph (input_ids + "
            "past_*) nor its encoder graph (input_ids + attention_mask); export it with edgelm"
        )


ADAPTER = OnnxRuntimeAdapter()
