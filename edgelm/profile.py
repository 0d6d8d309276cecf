"""Profiling: the same prompts, token counts and threads for every artifact.

Timings come from edgelm.generate.stream_tokens — the loop apps use — with a warm-up run
excluded and `repeats` measured runs summarised by their median and spread. Metric names
follow llama-bench: `pp` = prompt processing (prefill), `tg` = text generation (decode).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import psutil

from edgelm.generate import stream_tokens
from edgelm.sampling import SamplingConfig

# Fixed prompts so that rows from different artifacts, runs and devices are comparable.
DEFAULT_PROMPTS = (
    "Explain what a key-value cache does during text generation in a transformer language model, "
    "why it makes decoding faster, and what it costs in memory on a phone with limited RAM. "
    "Give a short example with numbers for a small model.",
)
VERSIONED_PACKAGES = (
    "edgelm",
    "numpy",
    "tokenizers",
    "torch",
    "transformers",
    "onnxruntime",
    "onnxruntime-genai",
    "gguf",
    "llama-cpp-python",
    "executorch",
    "ai-edge-litert",
)


def device_record() -> dict[str, Any]:
    """CPU model, cores, memory, OS and library versions of the machine running the profile."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


class PeakRSSSampler:
    """Samples this process's resident memory in a background thread (every `interval` s).

    Sparse on purpose: on a 2-core device a thread waking every few ms competes with the
    runtime's own threads and slows the decode it is measuring.
    """

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


@dataclass
class Profile:
    prompt_tokens: int
    new_tokens: int
    threads: int | None
    repeats: int
    load_s: float
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_tok_s_min: float
    decode_tok_s_max: float
    p50_token_ms: float
    p90_token_ms: float
    peak_rss_mb: float
    file_bytes: int
    device: dict[str, Any] = field(default_factory=dict)
    rss_scope: str = "process"  # what else lived in the measured process

    @property
    def llama_bench_names(self) -> dict[str, float]:
        return {f"pp{self.prompt_tokens}": self.prefill_tok_s, f"tg{self.new_tokens}": self.decode_tok_s}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": self.llama_bench_names}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def profile_session(
    session: Any,
    tokenizer: Any,
    *,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    max_new_tokens: int = 128,
    repeats: int = 3,
    load_s: float = 0.0,
    file_bytes: int = 0,
    threads: int | None = None,
    rss_scope: str = "process",
) -> Profile:
    """Time greedy generation of `max_new_tokens` (EOS ignored) for each prompt.

    One warm-up run is discarded; then `repeats` passes over the prompts. Reports medians
    and the min/max of decode tok/s across passes.
    """
    config = SamplingConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    encoded = [tokenizer.encode(p) for p in prompts]
    list(stream_tokens(session, tokenizer, encoded[0], config))  # warm-up
    ttfts, prefill_rates, decode_rates, step_ms = [], [], [], []
    with PeakRSSSampler() as rss:
        for _ in range(repeats):
            for ids in encoded:
                steps = [t for t in stream_tokens(session, tokenizer, ids, config) if t.token_id >= 0]
                ttfts.append(steps[0].seconds)
                prefill_rates.append(len(ids) / steps[0].seconds)
                decode_times = [t.seconds for t in steps[1:]]
                if decode_times:
                    decode_rates.append(len(decode_times) / sum(decode_times))
                    step_ms.extend(1000 * s for s in decode_times)
    return Profile(
        prompt_tokens=len(encoded[0]),
        new_tokens=max_new_tokens,
        threads=threads,
        repeats=repeats,
        load_s=load_s,
        ttft_s=statistics.median(ttfts),
        prefill_tok_s=statistics.median(prefill_rates),
        decode_tok_s=statistics.median(decode_rates) if decode_rates else 0.0,
        decode_tok_s_min=min(decode_rates, default=0.0),
        decode_tok_s_max=max(decode_rates, default=0.0),
        p50_token_ms=float(np.percentile(step_ms, 50)) if step_ms else 0.0,
        p90_token_ms=float(np.percentile(step_ms, 90)) if step_ms else 0.0,
        peak_rss_mb=rss.peak / 2**20,
        file_bytes=file_bytes,
        device=device_record(),
        rss_scope=rss_scope,
    )


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Call fn and return (result, seconds) — used for load times."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
