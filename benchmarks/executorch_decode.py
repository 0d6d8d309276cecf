"""ExecuTorch decode speed: edgelm's runtime vs a minimal loop on executorch.runtime, same .pte files.

    python benchmarks/executorch_decode.py BUNDLE [--out benchmarks/results/executorch_smollm2.json]

For every ExecuTorch artifact of the bundle: file size, edgelm `profile` (the shared
generation loop) and a greedy loop written directly against `executorch.runtime` (load the
program, execute `forward` with ids and position, argmax), same prompt ids, same token
count, same threads, best and median of `--repeats` interleaved rounds after a warm-up.
Also records parity from the manifest and, when fp32 and int4 are both there, the int4
size and decode-speed ratios to fp32. Writes JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import arguments, compare_decode


def executorch_runtime_decode_tok_s(path: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> float:
    """The loop a user writes with executorch.runtime: decode tok/s after the first token."""
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(path).load_method("forward")
    logits = method.execute([torch.tensor([prompt_ids]), torch.tensor([0])])[0]
    token, pos = int(logits[0, -1].argmax()), len(prompt_ids)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = method.execute([torch.tensor([[token]]), torch.tensor([pos])])[0]
        token, pos = int(logits[0, -1].argmax()), pos + 1
    return (new_tokens - 1) / (time.perf_counter() - start)


if __name__ == "__main__":
    compare_decode(
        arguments(__doc__.splitlines()[0], "benchmarks/results/executorch_smollm2.json"),
        "executorch",
        {"executorch_runtime": executorch_runtime_decode_tok_s},
    )
