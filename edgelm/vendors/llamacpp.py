"""llama.cpp's own high-level API (`llama_cpp.Llama`, llama-cpp-python): its tokenizer, its
sampler chain and its stop tokens, all read from the GGUF alone (the file carries the chat
template, BOS/EOS and end-of-turn tokens edgelm wrote into its metadata)."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelm.vendors import GenerationFacts, TokenClock, VendorRun

GREEDY = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


def open_llama(artifact: Path, threads: int | None, context: int = 2048) -> Any:
    """The GGUF in llama.cpp's Llama class, as an app using llama-cpp-python opens it (after
    edgelm's defensive header read, which refuses hostile files before llama.cpp parses them).

    The attention and KV-cache settings are the ones edgelm's own llama.cpp session uses (F32
    cache without flash attention for an F32 file, llama.cpp's F16 cache with flash attention
    otherwise), so that a difference between the two continuations is the loop's, the
    tokenizer's or the sampler's, not a kernel choice."""
    import llama_cpp

    from edgelm.gguf_header import read_gguf_summary
    from edgelm.runtimes.llamacpp import (
        FILE_TYPE_ALL_F32,
        GGML_TYPE_F16,
        GGML_TYPE_F32,
        llama_library,
    )

    f32 = read_gguf_summary(artifact).integer("general.file_type", -1) == FILE_TYPE_ALL_F32
    llama_library()  # backend initialised and its log silenced once per process
    return llama_cpp.Llama(
        model_path=str(artifact),
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=not f32,
        type_k=GGML_TYPE_F32 if f32 else GGML_TYPE_F16,
        type_v=GGML_TYPE_F32 if f32 else GGML_TYPE_F16,
        verbose=False,
    )


class LlamaCpp:
    name = "llama.cpp Llama.generate"
    package = "llama_cpp_python"
    import_names = ("llama_cpp",)
    text_per_token = False  # compared by token ids anyway

    def prepare(self, artifact: Path, bundle_dir: Path, facts: GenerationFacts) -> list[Path]:
        return []  # the GGUF is self-contained

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
        """The loop under `Llama.create_completion` (`Llama.generate`, greedy), on the prompt as
        create_completion tokenizes it (BOS where the GGUF asks for it, special tokens parsed),
        so that the token ids can be compared, not only the text."""
        start = time.perf_counter()
        llm = open_llama(artifact, threads)
        load_s = time.perf_counter() - start
        clock, text = TokenClock(), codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = set() if ignore_eos else {*facts.eos_ids, llm.token_eos()}
        prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        generated: list[int] = []
        try:
            for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                if token in stops or len(generated) == new_tokens:
                    break
                generated.append(int(token))
                clock.add(text.decode(llm.detokenize([token])))
                if on_text and clock.pieces[-1]:
                    on_text(clock.pieces[-1])
        finally:
            llm.close()
        return clock.run(load_s, ids=generated, prompt_ids=list(prompt_ids))


VENDOR = LlamaCpp()
