"""TFLite decode speed: edgelm's LiteRT runtime vs a minimal signature-runner loop, same .tflite files.

    python benchmarks/tflite_decode.py BUNDLE [--out benchmarks/results/tflite_smollm2.json]

For every TFLite artifact of the bundle: file size, edgelm `profile` (the shared generation
loop, working in the interpreter's own tensors) and the loop a user writes with
ai-edge-litert's SignatureRunner (the whole cache passed in on every call, the new
positions written back into it, argmax), same prompt ids, same token count, same threads,
best and median of `--repeats` interleaved rounds after a warm-up. Also records parity
from the manifest and each recipe's size and decode speed relative to fp32. Writes JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import arguments, compare_decode


def signature_runner_decode_tok_s(path: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> float:
    """Decode tok/s after the first token, through Interpreter.get_signature_runner."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    prefill, decode = interpreter.get_signature_runner("prefill"), interpreter.get_signature_runner("decode")
    details = decode.get_input_details()
    names = sorted(details, key=lambda k: int(k.removeprefix("args_")))
    caches = [np.zeros(details[name]["shape"], np.float32) for name in names[2:]]
    length = prefill.get_input_details()["args_0"]["shape"][1]

    def step(runner, ids: list[int], pos: int, width: int) -> int:
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(ids)] = ids
        inputs = {"args_0": padded, "args_1": np.array([pos], np.int32)}
        inputs |= {name: cache for name, cache in zip(names[2:], caches)}
        out = runner(**inputs)
        outputs = sorted(out, key=lambda k: int(k.removeprefix("output_")))
        for cache, name in zip(caches, outputs[1:]):
            cache[:, :, pos : pos + len(ids)] = out[name][:, :, : len(ids)]
        return int(out[outputs[0]][0, len(ids) - 1].argmax())

    token, pos = step(prefill, prompt_ids, 0, length), len(prompt_ids)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token, pos = step(decode, [token], pos, 1), pos + 1
    return (new_tokens - 1) / (time.perf_counter() - start)


if __name__ == "__main__":
    compare_decode(
        arguments(__doc__.splitlines()[0], "benchmarks/results/tflite_smollm2.json"),
        "tflite",
        {"signature_runner": signature_runner_decode_tok_s},
    )
