"""`edgelm serve` measured against the Python API on the same artifact, in one run.

    python benchmarks/serve.py --bundle /tmp/serve-bundle --out benchmarks/results/serve.json

The bundle is exported first if the folder does not exist (the default model, GGUF int4 — the
fastest faithful artifact of the peers run). Servers run as `python -m edgelm serve` processes
(2 threads), driven by the official openai client:

- single stream: TTFT (client-side, request sent → first content chunk) and decode tok/s of a
  128-token answer (EOS ignored), through the server with the prefix cache off, against
  `edgelm.load(...).stream` in this process; 5 interleaved rounds, medians;
- 8 concurrent clients: aggregate tok/s and p50/p90 TTFT, with `--parallel 1` (one request at
  a time, first come first served, so TTFT grows with the queue) and with 4 and 8 requests
  batched into each llama.cpp step;
- the runtime alone: decode tok/s of llama.cpp stepping 1, 4 and 8 sequences together
  (`open_batch`, no server), the ceiling batching can reach on this machine;
- multi-turn: TTFT of each of 10 turns of one chat that resends its history, with the prefix
  cache on and off;
- constrained decoding: llguidance's mask + accept per token on this vocabulary, and the decode
  tok/s of a json_object answer against a free one.

Memory read bandwidth is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_and_save, read_bandwidth_gb_s

from edgelm.profile import device_record

PROMPT = "Explain what a key-value cache does in a transformer language model, in plain words."
THREADS = 2
NEW_TOKENS = 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, bundle: Path, fmt: str, prefix_cache: bool, parallel: int = 4) -> None:
        import openai

        self.port = _free_port()
        command = [sys.executable, "-m", "edgelm", "serve", str(bundle), "--format", fmt, "--port", str(self.port)]
        command += ["--threads", str(THREADS), "--prefix-cache" if prefix_cache else "--no-prefix-cache"]
        command += ["--parallel", str(parallel)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=600
        )
        deadline = time.time() + 300
        while True:
            try:
                self.model = self.client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"the server did not start: {self.process.stderr.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.5)

    def chat(self, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> dict[str, Any]:
        """One streamed answer: TTFT, decode tok/s, text, usage."""
        sent = time.perf_counter()
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
        )
        first = last = None
        text, usage = [], None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
                text.append(chunk.choices[0].delta.content)
        tokens = usage.completion_tokens
        decode = (tokens - 1) / (last - first) if first and last and last > first else None
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        return {
            "ttft_s": first - sent,
            "decode_tok_s": decode,
            "text": "".join(text),
            "tokens": tokens,
            "cached": cached,
        }

    def chat_raw(self, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> dict[str, Any]:
        """The same answer read as raw server-sent events with httpx (json.loads per event, no
        pydantic): the server's cost without most of the openai client's, which shares the cores."""
        import httpx

        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        body |= {"stream_options": {"include_usage": True}, **extra}
        first = last = None
        usage = None
        sent = time.perf_counter()
        with httpx.stream(
            "POST", f"http://127.0.0.1:{self.port}/v1/chat/completions", json=body, timeout=600
        ) as answer:
            for line in answer.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                elif event["choices"] and event["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
        tokens = usage["completion_tokens"]
        return {"ttft_s": first - sent, "decode_tok_s": (tokens - 1) / (last - first), "tokens": tokens}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def direct_stream(lm: Any, max_tokens: int) -> dict[str, Any]:
    """The same answer through edgelm's loop in this process, timed the way the client times the
    server: when each token reaches the caller."""
    from edgelm.generate import stream_tokens

    ids = lm._prompt_ids(PROMPT, None)
    config = lm._config({"max_new_tokens": max_tokens, "ignore_eos": True})
    sent = time.perf_counter()
    arrivals = [time.perf_counter() for t in stream_tokens(lm.session(), lm.tokenizer, ids, config) if t.token_id >= 0]
    return {"ttft_s": arrivals[0] - sent, "decode_tok_s": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])}


def single_stream(bundle: Path, fmt: str, rounds: int) -> dict[str, Any]:
    import edgelm

    server = ServerProcess(bundle, fmt, prefix_cache=False)
    lm = edgelm.load(bundle, format=fmt, threads=THREADS)
    messages = [{"role": "user", "content": PROMPT}]
    server.chat(messages, 8, ignore_eos=True), direct_stream(lm, 8)  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {"server_raw_sse": [], "server_openai_client": [], "python_api": []}
    for _ in range(rounds):  # interleaved: drift in machine speed hits every row alike
        runs["server_raw_sse"].append(server.chat_raw(messages, NEW_TOKENS, ignore_eos=True))
        runs["server_openai_client"].append(server.chat(messages, NEW_TOKENS, ignore_eos=True))
        runs["python_api"].append(direct_stream(lm, NEW_TOKENS))
    lm.close()
    result: dict[str, Any] = {
        name: {
            "ttft_s": statistics.median(r["ttft_s"] for r in rows),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rows),
        }
        for name, rows in runs.items()
    }
    api = result["python_api"]
    for name in ("server_raw_sse", "server_openai_client"):
        result[name]["decode_overhead"] = 1 - result[name]["decode_tok_s"] / api["decode_tok_s"]
        result[name]["ttft_added_s"] = result[name]["ttft_s"] - api["ttft_s"]
    server.stop()
    result["concurrent"] = {}
    for parallel in (1, 4, 8):
        server = ServerProcess(bundle, fmt, prefix_cache=False, parallel=parallel)
        server.chat(messages, 8, ignore_eos=True)  # warm-up
        result["concurrent"][f"parallel_{parallel}"] = concurrent(server, 8)
        server.stop()
    return result


def concurrent(server: ServerProcess, clients: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        answer = server.chat([{"role": "user", "content": f"{PROMPT} (client {i})"}], 64, ignore_eos=True)
        with lock:
            results.append(answer)

    started = time.perf_counter()
    workers = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - started
    ttfts = sorted(r["ttft_s"] for r in results)
    return {
        "clients": clients,
        "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p90_s": ttfts[max(0, int(round(0.9 * len(ttfts))) - 1)],
        "wall_s": wall,
    }


def runtime_batch(bundle: Path, fmt: str, steps: int = 40) -> dict[str, Any]:
    """llama.cpp alone, every sequence one token per step after a 30-token prompt each."""
    from edgelm.bundle import read_bundle
    from edgelm.session import get_runtime

    entry = read_bundle(bundle).artifact(fmt)
    path, runtime = bundle / entry.path, get_runtime(entry.runtime)
    result = {}
    for sequences in (1, 4, 8):
        batch = runtime.open_batch(path, sequences, threads=THREADS)
        batch.step([(s, np.arange(100, 130)) for s in range(sequences)])
        started = time.perf_counter()
        for i in range(steps):
            batch.step([(s, np.array([200 + i])) for s in range(sequences)])
        elapsed = time.perf_counter() - started
        batch.close()
        result[f"sequences_{sequences}"] = {"step_ms": 1000 * elapsed / steps, "tok_s": sequences * steps / elapsed}
    return result


def multi_turn(bundle: Path, fmt: str, turns: int) -> dict[str, Any]:
    result = {}
    for cached in (True, False):
        server = ServerProcess(bundle, fmt, prefix_cache=cached)
        history = [{"role": "user", "content": PROMPT}]
        rows = []
        for turn in range(turns):
            answer = server.chat(history, 48)
            rows.append({"turn": turn + 1, "ttft_s": answer["ttft_s"], "cached_tokens": answer["cached"]})
            history += [
                {"role": "assistant", "content": answer["text"]},
                {"role": "user", "content": "Say more about that."},
            ]
        server.stop()
        result["prefix_cache" if cached else "no_prefix_cache"] = rows
    return result


def constrained_overhead(bundle: Path, fmt: str) -> dict[str, Any]:
    import edgelm
    from edgelm.constrained import GrammarConstraint
    from edgelm.generate import stream_tokens

    lm = edgelm.load(bundle, format=fmt, threads=THREADS)
    vocab = lm.session().capabilities.vocab_size or lm.tokenizer.vocab_size
    folder = bundle / lm.manifest.tokenizer["path"]
    ids = lm._prompt_ids("Describe a phone as a JSON object.", None)
    config = lm._config({"max_new_tokens": 96})
    rates = {}
    for name in ("free", "json_object", "free", "json_object"):  # interleaved, second round kept
        constraint = (
            GrammarConstraint.json_object(folder, vocab, lm.tokenizer.eos_token_ids) if name != "free" else None
        )
        times = [
            t.seconds
            for t in stream_tokens(lm.session(), lm.tokenizer, ids, config, constraint=constraint)
            if t.token_id >= 0
        ]
        rates[name] = (len(times) - 1) / sum(times[1:]) if len(times) > 1 else None
    constraint = GrammarConstraint.json_object(folder, vocab, lm.tokenizer.eos_token_ids)
    mask_s = []
    logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    for token in lm.tokenizer.encode(
        '{"name": "phone", "size": 6, "colors": ["black", "white"]}', add_special_tokens=False
    ):
        started = time.perf_counter()
        constraint.mask(logits)
        constraint.accept(token)
        mask_s.append(time.perf_counter() - started)
    lm.close()
    return {
        "library": "llguidance",
        "vocab_size": vocab,
        "mask_and_accept_ms_per_token": 1000 * statistics.median(mask_s),
        "decode_tok_s_free": rates["free"],
        "decode_tok_s_json_object": rates["json_object"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--format", default="gguf-int4")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.bundle.exists():
        fmt, quant = args.format.split("-")
        command = [sys.executable, "-m", "edgelm", "export", "--formats", fmt, "--quant", quant, "-o", str(args.bundle)]
        subprocess.run(command, check=True)
    report = {
        "bundle_artifact": args.format,
        "threads": THREADS,
        "new_tokens": NEW_TOKENS,
        "read_bandwidth_gb_s": read_bandwidth_gb_s(THREADS),
        "single_stream": single_stream(args.bundle, args.format, args.rounds),
        "runtime_batch": runtime_batch(args.bundle, args.format),
        "multi_turn": multi_turn(args.bundle, args.format, args.turns),
        "constrained": constrained_overhead(args.bundle, args.format),
        "device": device_record(),
    }
    print_and_save(report, args.out)


if __name__ == "__main__":
    main()
