"""The server's Prometheus metrics, in a registry of its own (one per app, so tests and several
servers in one process do not collide)."""

from __future__ import annotations

import os

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgelm_requests", "HTTP requests by route and status code", ["route", "code"], registry=r
        )
        self.errors = Counter(
            "edgelm_request_errors", "Requests answered with an error, by status code", ["code"], registry=r
        )
        self.ttft = Histogram(
            "edgelm_time_to_first_token_seconds", "Prefill and first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.token_latency = Histogram(
            "edgelm_token_latency_seconds", "One decode step and its sampling", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("edgelm_prompt_tokens", "Prompt tokens received", registry=r)
        self.reused_tokens = Counter(
            "edgelm_prefix_cache_reused_tokens", "Prompt tokens taken from the KV cache", registry=r
        )
        self.completion_tokens = Counter("edgelm_completion_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("edgelm_queue_depth", "Requests waiting for the model", registry=r)
        self.active = Gauge("edgelm_active_sessions", "Requests being generated now", registry=r)
        self.batch_sequences = Histogram(
            "edgelm_batch_sequences",
            "Requests each batched runtime step carried (GGUF with --parallel above 1)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        rss = Gauge("edgelm_resident_memory_bytes", "The server process's resident memory", registry=r)
        process = psutil.Process(os.getpid())
        rss.set_function(lambda: process.memory_info().rss)
