"""LiteRT runtime (ai-edge-litert): runs edgelm's .tflite decoders.

The model (exporters/tflite.py) has a `prefill` and a `decode` signature over the same
weights; inputs are (input_ids, input_pos, cache_key_0, cache_value_0, ...) and outputs
(logits, new_key_0, new_value_0, ...), positionally (LiteRT names them args_i / output_i).
The max context and prefill length are read from the signatures' shapes.

On CPU the session works in the interpreter's own tensors (XNNPACK delegate): the cache
inputs of both signatures are written in place, one new position at a time, so a decode
step moves a few kilobytes instead of the whole cache (LiteRT's signature runners copy every
input and output on every call, the peer baselines in the README). `device="gpu"` / `"npu"` go through LiteRT's
CompiledModel with its GPU / NPU accelerator (CPU fallback for unsupported ops), copying
the cache per step, and fail clearly where this install or machine has no such accelerator.
Every file is verified (edgelm.tflite_file) before LiteRT's native loader parses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import DeviceError, InvalidModelError
from edgelm.isolation import open_isolated, runs_here
from edgelm.native_log import quiet_native_stderr
from edgelm.session import Capabilities, model_failures, token_ids
from edgelm.tflite_file import read_tflite

LOG_VARIABLE = "EDGELM_LITERT_LOG"  # set to 1 to see LiteRT's own log lines
SIGNATURES = ("prefill", "decode")
ENCODER_PREFIX = "encode_"  # an encoder's signatures: encode_<padded length>


class InterpreterSteps:
    """Both signatures in one TFLite interpreter, run in its own tensor memory.

    Uses the interpreter wrapper's per-subgraph calls (what SignatureRunner itself calls)
    because SignatureRunner copies every input in and output out per call. Views into tensor
    memory are taken per step and dropped before Invoke, as the interpreter requires.
    """

    def __init__(self, path: Path, threads: int | None):
        from ai_edge_litert.interpreter import Interpreter

        with quiet_native_stderr(LOG_VARIABLE):
            interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
        self._interpreter = interpreter
        self._wrapper = interpreter._interpreter
        self.layout: dict[str, tuple[int, list[int], list[int]]] = {}  # signature -> (subgraph, inputs, outputs)
        for name in SIGNATURES:
            runner = interpreter.get_signature_runner(name)
            inputs, outputs = runner.get_input_details(), runner.get_output_details()
            subgraph = self._wrapper.GetSubgraphIndexFromSignature(name)
            self.layout[name] = (
                subgraph,
                [d["index"] for d in _ordered(inputs, "args_")],
                [d["index"] for d in _ordered(outputs, "output_")],
            )
            if not self.layout[name][2]:
                raise InvalidModelError(
                    f"its {name} signature has no outputs; it was not exported by edgelm's TFLite exporter"
                )
            with quiet_native_stderr(LOG_VARIABLE):
                self._wrapper.AllocateTensors(subgraph)
            for index in self.layout[name][1][2:]:
                self._view(name, index).fill(0)  # arena memory is not zeroed; masked slots must be finite
        self.shapes = {name: [tuple(self._view(name, i).shape) for i in self.layout[name][1]] for name in SIGNATURES}
        self.vocab_size = int(self._view("decode", self.layout["decode"][2][0]).shape[-1])

    def _view(self, name: str, index: int) -> np.ndarray:
        try:
            return self._wrapper.tensor(self._interpreter, index, self.layout[name][0])
        except ValueError as err:  # "Tensor data is null": a tensor table the file describes wrongly
            raise InvalidModelError(f"LiteRT cannot use this model's tensor {index} ({err}); re-export it") from err

    def run(self, name: str, ids: np.ndarray, position: int) -> np.ndarray:
        subgraph, inputs, outputs = self.layout[name]
        n = len(ids)
        view = self._view(name, inputs[0])
        view[0, :n] = ids
        view[0, n:] = 0  # padding after the real tokens: the causal mask keeps it out of their results
        self._view(name, inputs[1])[0] = position
        del view
        with quiet_native_stderr(LOG_VARIABLE), model_failures("LiteRT"):
            self._wrapper.Invoke(subgraph)
        logits = self._view(name, outputs[0])[0, :n].copy()
        for k, output in enumerate(outputs[1:]):
            new = self._view(name, output)[:, :, :n]
            for other in SIGNATURES:  # keep both signatures' caches identical
                self._view(other, self.layout[other][1][2 + k])[:, :, position : position + n] = new
        return logits

    def close(self) -> None:
        self._wrapper = self._interpreter = None


class CompiledModelSteps:
    """Both signatures through LiteRT's CompiledModel on an accelerator; the cache is host
    memory written to the accelerator's buffers before each call."""

    def __init__(self, path: Path, device: str, threads: int | None):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        accelerator = {"gpu": HardwareAccelerator.GPU, "npu": HardwareAccelerator.NPU}[device]
        options = Options(
            hardware_accelerators=accelerator | HardwareAccelerator.CPU,
            cpu_options=CpuOptions(num_threads=threads or 0),
        )
        try:
            with quiet_native_stderr(LOG_VARIABLE):
                model = CompiledModel.from_file(str(path), options=options)
        except RuntimeError as err:
            raise DeviceError(
                f"LiteRT could not set up its {device.upper()} accelerator for {path.name} ({err}); use device='cpu'"
            ) from err
        if not model.is_fully_accelerated():
            raise DeviceError(
                f"LiteRT has no {device.upper()} accelerator that runs {path.name} here (its ops fell "
                "back to the CPU); use device='cpu', or run it on a device that has one"
            )
        self._model = model
        self.shapes, self._io = {}, {}
        for name in SIGNATURES:
            ins = _ordered(model.get_input_tensor_details(name), "args_")
            outs = _ordered(model.get_output_tensor_details(name), "output_")
            if not outs:
                raise InvalidModelError(
                    f"its {name} signature has no outputs; it was not exported by edgelm's TFLite exporter"
                )
            self.shapes[name] = [tuple(d["shape"]) for d in ins]
            self._io[name] = (
                {d["key"]: model.create_input_buffer_by_name(name, d["key"]) for d in ins},
                {d["key"]: model.create_output_buffer_by_name(name, d["key"]) for d in outs},
                ins,
                outs,
            )
        self._cache = [np.zeros(shape, np.float32) for shape in self.shapes["decode"][2:]]
        self.vocab_size = int(self._io["decode"][3][0]["shape"][-1])

    def run(self, name: str, ids: np.ndarray, position: int) -> np.ndarray:
        inputs, outputs, ins, outs = self._io[name]
        n, length = len(ids), self.shapes[name][0][1]
        padded = np.zeros((1, length), np.int32)
        padded[0, :n] = ids
        values = [padded, np.array([position], np.int32), *self._cache]
        for d, value in zip(ins, values):
            inputs[d["key"]].write(value)
        with quiet_native_stderr(LOG_VARIABLE), model_failures("LiteRT"):
            self._model.run_by_name(name, inputs, outputs)
        read = [outputs[d["key"]].read(int(np.prod(d["shape"])), np.float32).reshape(d["shape"]) for d in outs]
        for cache, new in zip(self._cache, read[1:]):
            cache[:, :, position : position + n] = new[:, :, :n]
        return read[0][0, :n]

    def close(self) -> None:
        self._io.clear()
        self._model = None


class LiteRTEncoderSession:
    """An encoder model (one `encode_<L>` signature per padded length): each row of a batch
    is run alone, padded to the shortest length that fits it."""

    def __init__(self, path: Path, lengths: list[int], threads: int | None):
        from ai_edge_litert.interpreter import Interpreter

        with quiet_native_stderr(LOG_VARIABLE):
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
        self._runners = {
            length: self._interpreter.get_signature_runner(f"{ENCODER_PREFIX}{length}") for length in sorted(lengths)
        }
        self.capabilities = Capabilities(max_context=max(lengths), notes={"lengths": ", ".join(map(str, lengths))})

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        width = input_ids.shape[1]
        length = next((n for n in self._runners if n >= width), None)
        if length is None:
            raise InvalidModelError(f"the model takes at most {self.capabilities.max_context} tokens; {width} given")
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            padded = np.zeros((2, 1, length), np.int32)
            padded[0, 0, :width], padded[1, 0, :width] = ids, mask
            with quiet_native_stderr(LOG_VARIABLE), model_failures("LiteRT", (RuntimeError, ValueError)):
                out = self._runners[length](args_0=padded[0], args_1=padded[1])
            rows.append(next(iter(out.values()))[0])
        return np.stack(rows).astype(np.float32)

    def close(self) -> None:
        self._runners.clear()
        self._interpreter = None


class LiteRTSession:
    def __init__(self, steps: Any, device: str):
        self._steps = steps
        self.max_context = int(steps.shapes["decode"][2][2])
        self.prefill_length = int(steps.shapes["prefill"][0][1])
        self._pos = 0
        self.capabilities = Capabilities(
            max_context=self.max_context,
            vocab_size=steps.vocab_size,
            notes={"kv_cache": f"host-owned, {self.max_context} positions", "prefill_length": str(self.prefill_length)},
        )

    def _check_room(self, n: int) -> None:
        if self._pos + n > self.max_context:
            raise InvalidModelError(f"the model's cache holds {self.max_context} positions; {self._pos + n} requested")

    def _run(self, name: str, ids: np.ndarray) -> np.ndarray:
        logits = self._steps.run(name, ids, self._pos)
        self._pos += len(ids)
        return logits

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        ids = token_ids(ids, self.capabilities)  # the graph takes int32 ids: a larger one would wrap silently
        self._check_room(len(ids))
        chunks = [ids[i : i + self.prefill_length] for i in range(0, len(ids), self.prefill_length)]
        return np.concatenate([self._run("prefill", chunk) for chunk in chunks])

    def decode(self, token_id: int) -> np.ndarray:
        ids = token_ids([token_id], self.capabilities)
        self._check_room(1)
        return self._run("decode", ids)[-1]

    def reset(self) -> None:
        # slots at or past the position are masked in the graph, so old entries are never read
        self._pos = 0

    def close(self) -> None:
        self._steps.close()


def _ordered(details: dict[str, dict], prefix: str) -> list[dict]:
    """Signature tensors in positional order (args_0, args_1, ... / output_0, ...), each with its key."""
    try:
        keys = sorted(details, key=lambda key: int(key.removeprefix(prefix)))
    except ValueError as err:
        raise InvalidModelError(f"unexpected tensor names in the model's signature: {sorted(details)}") from err
    return [{**details[key], "key": key} for key in keys]


def _check_decoder_signatures(path: Path, summary: Any) -> None:
    """edgelm's prefill/decode signatures, read from the verified flatbuffer before LiteRT sees it."""
    missing = set(SIGNATURES) - set(summary.signatures)
    if missing:
        raise InvalidModelError(
            f"{path}: the model lacks the {', '.join(sorted(missing))} signature(s); it was "
            "not exported by edgelm's TFLite exporter"
        )
    inputs = summary.signatures["decode"][0]
    if len(inputs) < 4 or len(inputs) % 2:
        raise InvalidModelError(f"{path}: its decode signature is not (input_ids, input_pos, cache...)")
    if not all(summary.signatures[name][1] for name in SIGNATURES):
        raise InvalidModelError(
            f"{path}: a signature of it has no outputs; it was not exported by edgelm's TFLite exporter"
        )


class LiteRTAdapter:
    name = "litert"

    def version(self) -> str:
        from importlib import metadata

        return f"ai-edge-litert {metadata.version('ai-edge-litert')}"

    def preload(self) -> None:
        """Load LiteRT's interpreter without opening a file (edgelm.isolation's fork server)."""
        import ai_edge_litert.interpreter  # noqa: F401

    def available_devices(self) -> tuple[str, ...]:
        return ("cpu", "gpu", "npu")  # gpu/npu are checked when a model is compiled for them

    def open(self, path: Path, device: str = "cpu", threads: int | None = None) -> LiteRTSession | LiteRTEncoderSession:
        if device not in self.available_devices():
            raise DeviceError(f"LiteRT runs on cpu, gpu or npu, not {device!r}")
        path = Path(path)
        summary = read_tflite(path)
        lengths = [
            int(name.removeprefix(ENCODER_PREFIX))
            for name in summary.signatures
            if name.startswith(ENCODER_PREFIX) and name.removeprefix(ENCODER_PREFIX).isdigit()
        ]
        if lengths and device != "cpu":
            raise DeviceError(f"edgelm runs TFLite encoders on cpu only here, not {device!r}")
        if not lengths:
            _check_decoder_signatures(path, summary)
        if not runs_here(path):  # its native code can end the process on a damaged file
            return open_isolated(self.name, path, device, threads)
        if lengths:
            try:
                return LiteRTEncoderSession(path, lengths, threads)
            except (ValueError, RuntimeError) as err:
                raise InvalidModelError(f"{path}: LiteRT could not load it ({err}); re-export it with edgelm") from err
        try:
            steps = InterpreterSteps(path, threads) if device == "cpu" else CompiledModelSteps(path, device, threads)
        except (ValueError, RuntimeError) as err:
            raise InvalidModelError(f"{path}: LiteRT could not load it ({err}); re-export it with edgelm") from err
        return LiteRTSession(steps, device)


ADAPTER = LiteRTAdapter()
