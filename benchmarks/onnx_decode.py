"""ONNX decode speed: edgelm's runtime vs a minimal hand-written onnxruntime loop, same files.

    python benchmarks/onnx_decode.py BUNDLE [--out benchmarks/results/onnx_smollm2.json]

For every ONNX artifact of the bundle: file size, edgelm `profile` (the shared generation
loop, IO-bound cache) and a plain greedy loop written directly against onnxruntime
(numpy feeds, `session.run`), same prompt, same token count, same threads, best of
`--repeats` interleaved rounds after a warm-up. Also records parity from the manifest. Writes JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import arguments, compare_decode


def hand_written_decode_tok_s(path: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> float:
    """The loop a user writes against onnxruntime directly: numpy in, numpy out."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_")]
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    length = len(prompt_ids)

    def mask() -> dict[str, np.ndarray]:  # edgelm's GroupQueryAttention graphs read positions off it
        return {"attention_mask": np.ones((1, length), np.int64)}

    out = session.run(None, {"input_ids": np.asarray([prompt_ids], np.int64), **mask(), **empty})
    token = int(out[0][0, -1].argmax())
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        length += 1
        feeds = {"input_ids": np.asarray([[token]], np.int64), **mask()}
        feeds.update({i.name: v for i, v in zip(past_inputs, out[1:])})
        out = session.run(None, feeds)
        token = int(out[0][0, -1].argmax())
    return (new_tokens - 1) / (time.perf_counter() - start)


if __name__ == "__main__":
    compare_decode(
        arguments(__doc__.splitlines()[0], "benchmarks/results/onnx_smollm2.json"),
        "onnx",
        {"hand_written_ort": hand_written_decode_tok_s},
    )
