"""LiteRT runtime (ai-edge-litert): runs edgelm's .tflite decoders the way LiteRT-LM does.

The model (exporters/tflite.py) has a `prefill` and a `decode` signature over the same
weights, in LiteRT-LM's names: inputs `tokens`, `input_pos`, `kv_cache_k_<i>`/`kv_cache_v_<i>`;
outputs `logits` and the updated caches under the inputs' names. The session runs both
through LiteRT's CompiledModel with one set of cache buffers bound as input and output of
both signatures (LiteRT-LM's CPU executor does the same), so a step's dynamic-update-slice
writes only the new positions and nothing crosses into Python but the token ids, their
positions and the logits. The max context and prefill length are read from the signatures'
shapes. `device="gpu"` / `"npu"` ask LiteRT for that accelerator and fail clearly where
this install or machine has none. Every file is verified (edgelm.tflite_file) before
LiteRT's native loader parses it.
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
CACHE_PREFIX = "kv_cache_"  # LiteRT-LM's cache tensor names: kv_cache_k_<i>, kv_cache_v_<i>
DECODER_INPUTS = ("tokens", "input_pos")


class CompiledSteps:
    """Both signatures in one LiteRT CompiledModel, sharing one set of cache buffers that each
    signature takes in and gives back (aliased: the graph updates them in place)."""

    def __init__(self, path: Path, device: str, threads: int | None):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        accelerator = {"cpu": HardwareAccelerator.CPU, "gpu": HardwareAccelerator.GPU, "npu": HardwareAccelerator.NPU}
        options = Options(
            hardware_accelerators=accelerator[device] | HardwareAccelerator.CPU,
            cpu_options=CpuOptions(num_threads=threads or os.cpu_count() or 1),
        )
        try:
            with quiet_native_stderr(LOG_VARIABLE):
                model = CompiledModel.from_file(str(path), options=options)
        except RuntimeError as err:
            if device == "cpu":
                raise
            raise DeviceError(
                f"LiteRT could not set up its {device.upper()} accelerator for {path.name} ({err}); use device='cpu'"
            ) from err
        if device != "cpu" and not model.is_fully_accelerated():
            raise DeviceError(
                f"LiteRT has no {device.upper()} accelerator that runs {path.name} here (its ops fell "
                "back to the CPU); use device='cpu', or run it on a device that has one"
            )
        self._model = model
        details = {
            name: (model.get_input_tensor_details(name), model.get_output_tensor_details(name)) for name in SIGNATURES
        }
        decode_inputs = details["decode"][0]
        cache_names = [key for key in decode_inputs if key.startswith(CACHE_PREFIX)]
        self.cache_shape = tuple(decode_inputs[cache_names[0]]["shape"])
        self.cache = {key: model.create_input_buffer_by_name("decode", key) for key in cache_names}
        for key, buffer in self.cache.items():
            # a buffer's memory is not zeroed; masked slots must hold finite values (0 × NaN is NaN)
            buffer.write(np.zeros(decode_inputs[key]["shape"], np.float32))
        self._io: dict[str, tuple] = {}
        for name, (ins, outs) in details.items():
            buffers = {key: model.create_input_buffer_by_name(name, key) for key in ("tokens", "input_pos")}
            logits = model.create_output_buffer_by_name(name, "logits")
            self._io[name] = (
                tuple(ins["tokens"]["shape"]),
                tuple(outs["logits"]["shape"]),
                {**buffers, **self.cache},
                {"logits": logits, **self.cache},
            )
        self.prefill_length = self._io["prefill"][0][1]
        self.vocab_size = int(self._io["decode"][1][-1])

    def run(self, name: str, ids: np.ndarray, position: int) -> np.ndarray:
        """Logits [n, vocab] of the n tokens `ids` at positions position.. (padded as LiteRT-LM pads)."""
        tokens_shape, logits_shape, inputs, outputs = self._io[name]
        n = len(ids)
        tokens = np.zeros(tokens_shape, np.int32)
        tokens[0, :n] = ids
        positions = np.zeros(tokens_shape[1:], np.int32)
        positions[:n] = np.arange(position, position + n)
        inputs["tokens"].write(tokens)
        inputs["input_pos"].write(positions)
        with quiet_native_stderr(LOG_VARIABLE), model_failures("LiteRT"):
            self._model.run_by_name(name, inputs, outputs)
        rows = logits_shape[1] if name == "decode" else n  # read only the real positions' rows
        return outputs["logits"].read(rows * logits_shape[-1], np.float32).reshape(rows, -1)[:n]

    def close(self) -> None:
        self._io.clear()
        self.cache.clear()
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
    def __init__(self, steps: CompiledSteps, device: str):
        self._steps = steps
        self.max_context = int(steps.cache_shape[2])
        self.prefill_length = int(steps.prefill_length)
        self._pos = 0
        self.capabilities = Capabilities(
            max_context=self.max_context,
            vocab_size=steps.vocab_size,
            notes={
                "kv_cache": f"{self.max_context} positions, updated in place",
                "prefill_length": str(self.prefill_length),
            },
        )

    def _check_room(self, n: int) -> None:
        if self._pos + n > self.max_context:
            raise InvalidModelError(f"the model's cache holds {self.max_context} positions; {self._pos + n} requested")

    def _run(self, name: str, ids: np.ndarray) -> np.ndarray:
        logits = self._steps.run(name, ids, self._pos)
        self._pos += len(ids)
        return logits

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """In chunks of the prefill signature's length; a chunk whose padding would run past the
        cache's end goes token by token through decode (a dynamic-update-slice that does not fit
        is moved back by the runtime, onto earlier positions)."""
        ids = token_ids(ids, self.capabilities)  # the graph takes int32 ids: a larger one would wrap silently
        self._check_room(len(ids))
        outputs, start = [], 0
        while start < len(ids):
            if self._pos + self.prefill_length <= self.max_context:
                chunk = ids[start : start + self.prefill_length]
                outputs.append(self._run("prefill", chunk))
            else:
                chunk = ids[start : start + 1]
                outputs.append(self._run("decode", chunk))
            start += len(chunk)
        return np.concatenate(outputs)

    def decode(self, token_id: int) -> np.ndarray:
        ids = token_ids([token_id], self.capabilities)
        self._check_room(1)
        return self._run("decode", ids)[-1]

    def reset(self) -> None:
        # slots at or past the position are masked in the graph, so old entries are never read
        self._pos = 0

    def truncate(self, length: int) -> None:
        self._pos = min(self._pos, max(0, length))  # as reset: later slots are masked, then overwritten

    def close(self) -> None:
        self._steps.close()


def _check_decoder_signatures(path: Path, summary: Any) -> None:
    """edgelm's prefill/decode signatures in LiteRT-LM's names, read from the verified flatbuffer
    before LiteRT sees it."""
    missing = set(SIGNATURES) - set(summary.signatures)
    if missing:
        raise InvalidModelError(
            f"{path}: the model lacks the {', '.join(sorted(missing))} signature(s); it was "
            "not exported by edgelm's TFLite exporter"
        )
    for name in SIGNATURES:
        inputs, outputs = summary.signatures[name]
        caches = [key for key in inputs if key.startswith(CACHE_PREFIX)]
        if not set(DECODER_INPUTS) <= set(inputs) or not caches or "logits" not in outputs:
            raise InvalidModelError(
                f"{path}: its {name} signature is not (tokens, input_pos, kv_cache_*) -> (logits, kv_cache_*); "
                "re-export it with this edgelm (earlier versions wrote a different layout)"
            )
        if not set(caches) <= set(outputs):
            raise InvalidModelError(f"{path}: its {name} signature does not give back the caches it takes")


class LiteRTAdapter:
    name = "litert"

    def version(self) -> str:
        from importlib import metadata

        return f"ai-edge-litert {metadata.version('ai-edge-litert')}"

    def preload(self) -> None:
        """Load LiteRT's interpreter without opening a file (edgelm.isolation's fork server)."""
        import ai_edge_litert.compiled_model  # noqa: F401
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
            steps = CompiledSteps(path, device, threads)
        except (ValueError, RuntimeError) as err:
            raise InvalidModelError(f"{path}: LiteRT could not load it ({err}); re-export it with edgelm") from err
        return LiteRTSession(steps, device)


ADAPTER = LiteRTAdapter()
