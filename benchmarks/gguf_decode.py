"""GGUF decode speed: edgelm's llama.cpp runtime vs llama-cpp-python's high-level `Llama`, same files.

    python benchmarks/gguf_decode.py BUNDLE [--out benchmarks/results/gguf_smollm2.json]

For every GGUF artifact of the bundle: file size, edgelm `profile` (the shared generation
loop over the low-level API) and two loops on llama-cpp-python's high-level `Llama` class:
`Llama.generate` (greedy via its sampler, top_k=1) and `Llama.eval` + argmax of its logits
(no sampler), same prompt ids, same token count, same context settings, best and
median of `--repeats` interleaved rounds after a warm-up. Also records parity from the
manifest. Writes JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import arguments, compare_decode

from edgelm.runtimes.llamacpp import BATCH, DEFAULT_CONTEXT


def _llama(path: Path, threads: int):
    from llama_cpp import Llama

    # the context edgelm's runtime creates: same size, batch, threads, and flash attention on
    # (llama.cpp's "auto" on CPU; the Llama class defaults it off)
    return Llama(
        model_path=str(path),
        n_ctx=DEFAULT_CONTEXT,
        n_batch=BATCH,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        verbose=False,
    )


def llama_generate_decode_tok_s(path: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> float:
    """`Llama.generate`, greedy through its sampler: decode tok/s after the first token."""
    llm = _llama(path, threads)
    stamps = []
    for _ in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == new_tokens:
            break
    llm.close()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def llama_eval_decode_tok_s(path: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> float:
    """`Llama.eval` one token at a time, greedy by argmax of the logits it keeps (no sampler)."""
    import numpy as np

    llm = _llama(path, threads)
    llm.eval(prompt_ids)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    rate = (new_tokens - 1) / (time.perf_counter() - start)
    llm.close()
    return rate


if __name__ == "__main__":
    compare_decode(
        arguments(__doc__.splitlines()[0], "benchmarks/results/gguf_smollm2.json"),
        "gguf",
        {"llama_generate": llama_generate_decode_tok_s, "llama_eval": llama_eval_decode_tok_s},
    )
