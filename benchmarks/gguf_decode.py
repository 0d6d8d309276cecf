"""GGUF decode speed: edgelm's llama.cpp runtime vs llama-cpp-python's high-level `Llama`, same files.

    python benchmarks/gguf_decode.py BUNDLE [--out benchmarks/results/gguf_smollm2.json]

For every GGUF artifact of the bundle: file size, edgelm `profile` (the shared generation
loop over the low-level API) and `Llama.generate` (greedy, top_k=1), same prompt ids, same
token count, same threads and context size, best and median of `--repeats` interleaved
rounds after a warm-up. Also records parity from the manifest. Writes JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import arguments, compare_decode

from edgelm.runtimes.llamacpp import BATCH, DEFAULT_CONTEXT


def high_level_llama_decode_tok_s(path: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> float:
    """The loop a user writes with llama-cpp-python's `Llama`: decode tok/s after the first token."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=DEFAULT_CONTEXT, n_batch=BATCH, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    stamps = []
    for _ in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == new_tokens:
            break
    llm.close()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


if __name__ == "__main__":
    compare_decode(arguments(__doc__.splitlines()[0], "benchmarks/results/gguf_smollm2.json"), "gguf",
                   high_level_llama_decode_tok_s, "llama_cpp_high_level")
