"""ExecuTorch's LLM runner (`TextLLMRunner`, the C++ runner that Android's `LlmModule` wraps).

The runner reads the model's facts from constant methods of the .pte (`get_max_seq_len`,
`get_max_context_len`, `get_bos_id`, `get_eos_ids`, `use_kv_cache`, `enable_dynamic_shape`,
... see `RUNNER_METHODS`, which edgelm's exporter writes), calls `forward(tokens[1, n],
input_pos[1])` — edgelm's static-cache calling convention — and tokenizes with
pytorch-tokenizers, which reads the bundle's HF `tokenizer.json`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelm.native_log import captured_native_stdout, quiet_native_streams
from edgelm.vendors import GenerationFacts, VendorRun

LOG_VARIABLE = "EDGELM_EXECUTORCH_LOG"
STATS_MARKER = b"\nPyTorchObserver {"  # the runner prints its stats after the text


def runner_methods(max_context: int, facts_bos: int | None, eos_ids: tuple[int, ...]) -> dict[str, Any]:
    """The constant methods ExecuTorch's LLM runner reads (extension/llm/runner/constants.h):
    the prompt may be prefilled in one call up to the whole context (the program's token
    dimension is dynamic), the cache lives inside the program, and these tokens stop it."""
    methods: dict[str, Any] = {
        "get_max_seq_len": max_context,
        "get_max_context_len": max_context,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
    }
    if eos_ids:
        methods["get_eos_ids"] = list(eos_ids)
    if facts_bos is not None:
        methods["get_bos_id"] = facts_bos
    return methods


class ExecuTorchRunner:
    name = "executorch TextLLMRunner"
    package = "executorch"
    import_names = ("executorch.extension.llm.runner",)
    text_per_token = True  # it prints each token's text alone, dropping pieces that are not valid UTF-8

    def prepare(self, artifact: Path, bundle_dir: Path, facts: GenerationFacts) -> list[Path]:
        return []  # everything the runner reads is inside the .pte and tokenizer.json

    def generate(
        self,
        artifact: Path,
        bundle_dir: Path,
        prompt: str,
        facts: GenerationFacts,
        new_tokens: int,
        threads: int | None,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> VendorRun:
        from edgelm.runtimes.executorch import load_kernel_libraries

        load_kernel_libraries()  # the quantized and llama custom-op kernels an app links in
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

        del ignore_eos  # the runner's Python binding has no ignore_eos; tokens are counted instead

        stats: list[Any] = []
        with quiet_native_streams(LOG_VARIABLE, (2,)), captured_native_stdout() as printed:
            start = time.perf_counter()
            runner = TextLLMRunner(str(artifact), str(facts.tokenizer_dir / "tokenizer.json"))
            load_s = time.perf_counter() - start
            config = GenerationConfig(
                echo=False, max_new_tokens=new_tokens, temperature=0.0, num_bos=1 if facts.bos_id is not None else 0
            )
            runner.generate(prompt, config, stats_callback=stats.append)
        text = printed[0].rsplit(STATS_MARKER, 1)[0].decode("utf-8", errors="replace")
        if on_text:  # the runner's Python binding cannot stream a piece that is not valid UTF-8 on its own
            on_text(text)
        generated = int(stats[0].num_generated_tokens) if stats else 0
        span_ms = (stats[0].inference_end_ms - stats[0].first_token_ms) if stats else 0
        rate = (generated - 1) / (span_ms / 1000) if generated > 1 and span_ms > 0 else None
        ttft = (stats[0].first_token_ms - stats[0].inference_start_ms) / 1000 if stats else None
        return VendorRun(text=text, tokens=generated, decode_tok_s=rate, load_s=load_s, ttft_s=ttft)


VENDOR = ExecuTorchRunner()
