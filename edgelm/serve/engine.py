"""The served artifact and its workers.

A session holds one sequence's KV cache. Where the runtime can advance several sequences in one
step (llama.cpp), `parallel` requests generate at once, batched by edgelm.serve.batching; else
requests run one at a time. Either way each request has a slot (a sequence and the ids its cache
holds), requests beyond the slots wait in arrival order (fair: first come, first served), and a
request takes the free slot whose conversation it continues (edgelm.prefix_cache): a chat that
resends its history continues from where it was. Each
request's tokens are handed to the event loop as they are made; a client that goes away sets
its job's `cancelled`, and the worker stops at the next token (or skips the job if it is still
queued), so the slot frees at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.api import LanguageModel, TextEncoder, load
from edgelm.constrained import GrammarConstraint
from edgelm.generate import stream_tokens
from edgelm.prefix_cache import CachedPrefix, common_prefix
from edgelm.sampling import SamplingConfig
from edgelm.serve.batching import StepScheduler
from edgelm.serve.metrics import ServerMetrics
from edgelm.session import get_runtime


@dataclass
class Job:
    """One generation request on its way through the worker."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    constraint: GrammarConstraint | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" or "length" (OpenAI's finish_reason)
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int  # prompt tokens taken from the KV cache
    ttft_s: float
    decode_tok_s: float | None


class ServedModel:
    """One artifact of a bundle, loaded once, generating for up to `parallel` requests at a time
    (batched, where its runtime can: `batched`; else one).

    The slots' sessions belong to the workers: a slot's prefix cache records what its session
    holds, so anything else that ran it (e.g. `self.model.generate`) would leave the record wrong."""

    def __init__(
        self,
        bundle: Path,
        format: str | None,
        threads: int | None,
        metrics: ServerMetrics,
        prefix_cache: bool = True,
        parallel: int = 1,
    ) -> None:
        self.bundle = Path(bundle)
        self.model = load(self.bundle, format=format, threads=threads)
        self.id = self.bundle.resolve().name
        self.metrics = metrics
        self.created = int(self.bundle.joinpath("manifest.json").stat().st_mtime)
        self.scheduler: StepScheduler | None = None
        sessions: list[Any] = []
        if isinstance(self.model, LanguageModel):
            self.scheduler = self._batch(parallel, threads)
            batch = self.scheduler
            sessions = [batch.sequence(i) for i in range(parallel)] if batch else [self.model.session()]
        self._slots = [CachedPrefix(session, reuse=prefix_cache) for session in sessions]
        self._free = list(self._slots)
        self._last_used: dict[int, float] = {}  # id(slot) -> when its last request ended
        self._slot_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=max(1, len(self._slots)), thread_name_prefix="edgelm-serve")

    def _batch(self, parallel: int, threads: int | None) -> StepScheduler | None:
        """A scheduler over `parallel` sequences, where there are several and the runtime can batch them."""
        runtime = get_runtime(self.model.artifact.runtime)
        if parallel <= 1 or not hasattr(runtime, "open_batch"):
            return None
        path = self.bundle / self.model.artifact.path
        scheduler = StepScheduler(runtime.open_batch(path, parallel, threads=threads), on_step=self._counted)
        self.model.session().close()  # the batch's sequences serve every request: free the idle cache (and process)
        return scheduler

    def _counted(self, sequences: int) -> None:
        self.metrics.batch_sequences.observe(sequences)

    @property
    def batched(self) -> int:
        """How many requests generate at once (1 where the runtime cannot batch)."""
        return len(self._slots) if self.scheduler else 1

    def _take_slot(self, prompt_ids: list[int]) -> CachedPrefix:
        """The free slot whose conversation this prompt continues (it starts with that slot's
        whole last prompt, as a chat client's next turn does); else the least recently used (an
        empty one first), so a new conversation does not evict another's history for the opening
        tokens of the chat template that every prompt shares."""
        with self._slot_lock:
            shared = {id(slot): common_prefix(slot.ids, prompt_ids) for slot in self._free}
            continuing = [slot for slot in self._free if slot.ids and shared[id(slot)] >= slot.prompt_length]
            if continuing:
                best = max(continuing, key=lambda slot: shared[id(slot)])
            else:
                best = min(self._free, key=lambda slot: self._last_used.get(id(slot), -1.0))
            self._free.remove(best)
            return best

    def _give_back(self, slot: CachedPrefix) -> None:
        with self._slot_lock:
            self._last_used[id(slot)] = time.monotonic()
            self._free.append(slot)

    @property
    def is_decoder(self) -> bool:
        return isinstance(self.model, LanguageModel)

    @property
    def is_encoder(self) -> bool:
        return isinstance(self.model, TextEncoder)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def sampling(self, settings: dict[str, Any]) -> SamplingConfig:
        return SamplingConfig.from_dict({**self.model.manifest.generation, **settings})

    def constraint(self, kind: str, spec: Any) -> GrammarConstraint:
        """A grammar over this model's vocabulary: kind is json_schema, json_object, regex or lark."""
        vocab = self._slots[0].session.capabilities.vocab_size or self.tokenizer.vocab_size
        folder = self.bundle / self.model.manifest.tokenizer["path"]
        eos = self.tokenizer.eos_token_ids
        if kind == "json_object":
            return GrammarConstraint.json_object(folder, vocab, eos)
        return getattr(GrammarConstraint, kind)(spec, folder, vocab, eos)

    async def stream(self, job: Job) -> AsyncIterator[Piece | Finished]:
        """The job's pieces of text, then how it finished; exceptions from the worker are raised here."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.metrics.queue_depth.inc()
        loop.run_in_executor(self._worker, self._generate, job, loop, queue)  # _generate raises nothing
        try:
            pending = None
            while True:
                item, pending = pending or await queue.get(), None
                while isinstance(item, Piece) and not queue.empty():  # pieces queued while the loop was busy: one chunk
                    following = queue.get_nowait()
                    if isinstance(following, Piece):
                        item = Piece(item.text + following.text)
                    else:
                        pending = following
                        break
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    break
        finally:
            job.cancelled.set()  # the client went away (or we are done): the worker stops at the next token

    def _generate(self, job: Job, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        """On the worker thread: run the job, handing each piece to the event loop."""
        self.metrics.queue_depth.dec()
        if job.cancelled.is_set():
            return
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        self.metrics.active.inc()
        slot = self._take_slot(job.prompt_ids)
        if self.scheduler:
            self.scheduler.running(+1)
        try:
            put(self._run(job, put, slot))
        except BaseException as err:  # noqa: BLE001 — raised again on the event loop, where the request is
            put(err)
        finally:
            if self.scheduler:
                self.scheduler.running(-1)
            self._give_back(slot)
            self.metrics.active.dec()

    def _run(self, job: Job, put: Any, slot: CachedPrefix) -> Finished:
        generated, times = 0, []
        started = time.perf_counter()
        for token in stream_tokens(
            slot.session, self.tokenizer, job.prompt_ids, job.sampling, cache=slot, constraint=job.constraint
        ):
            if job.cancelled.is_set():
                break
            if token.token_id >= 0:
                generated += 1
                times.append(token.seconds)
            if token.text:
                put(Piece(token.text))
        ttft = times[0] if times else time.perf_counter() - started
        decode = float(np.sum(times[1:])) if len(times) > 1 else 0.0
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        self.metrics.reused_tokens.inc(slot.reused)
        self.metrics.completion_tokens.inc(generated)
        if times:
            self.metrics.ttft.observe(ttft)
        for seconds in times[1:]:
            self.metrics.token_latency.observe(seconds)
        room = slot.session.capabilities.max_context - len(job.prompt_ids)
        full = generated >= min(job.sampling.max_new_tokens, room)
        return Finished(
            reason="length" if full else "stop",
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=generated,
            reused_tokens=slot.reused,
            ttft_s=ttft,
            decode_tok_s=(len(times) - 1) / decode if decode > 0 else None,
        )

    async def embed(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self.model.embed, texts)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        if self.scheduler:
            self.scheduler.close()
        self.model.close()
