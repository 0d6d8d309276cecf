"""Continuous batching: concurrent requests advanced together on a runtime that runs several
sequences in one step (llama.cpp: edgelm.runtimes.llamacpp.LlamaCppBatch).

Every request keeps the one generation loop (edgelm.generate.stream_tokens) on its own worker
thread, over a `BatchedSequence`: a Session whose prefill and decode hand their tokens to the
`StepScheduler` and wait for the logits. The scheduler's thread gathers what every running
request asked for and runs them all in one runtime step, so the weights are read once per step
for all of them; on a CPU whose decode is bound by memory reads, four clients get several times
the tokens per second of one. A request joins or leaves between steps; a long prompt is cut
into chunks so that it never holds the others' next tokens for more than one step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelm.errors import PromptError
from edgelm.session import Capabilities, token_ids

# How long a step waits for running requests that have not asked yet (sampling, detokenizing):
# at least GATHER_S, and up to half the last step's time on a slow or busy machine, where a
# request left out would wait a whole step and the requests drift apart into smaller steps.
GATHER_S = 0.003
GATHER_SHARE = 0.5


@dataclass
class _Ask:
    """One sequence's tokens waiting for a step, and then its answer."""

    sequence: int
    ids: np.ndarray
    done_tokens: int = 0
    logits: np.ndarray | None = None
    error: BaseException | None = None
    answered: threading.Event = field(default_factory=threading.Event)


class StepScheduler:
    """Owns a batch runtime (`step(work)`, `truncate(sequence, length)`, `sequences`, `n_batch`,
    `capabilities`) and the thread that steps it."""

    def __init__(self, batch: Any, gather_s: float = GATHER_S, on_step: Callable[[int], None] | None = None) -> None:
        self.batch = batch
        self._on_step = on_step or (lambda sequences: None)  # told how many sequences each step carried
        self.capabilities: Capabilities = batch.capabilities
        self.gather_s = gather_s
        self._last_step_s = 0.0
        self._cond = threading.Condition()
        self._asks: dict[int, _Ask] = {}
        self._running = 0
        self._closed = False
        self._runtime = threading.Lock()  # steps and truncations never overlap
        self._thread = threading.Thread(target=self._loop, name="edgelm-batch", daemon=True)
        self._thread.start()

    def sequence(self, index: int) -> BatchedSequence:
        return BatchedSequence(self, index)

    def running(self, delta: int) -> None:
        """A request started (+1) or ended (-1) generating: the number of asks a step waits for."""
        with self._cond:
            self._running += delta
            self._cond.notify_all()

    def ask(self, sequence: int, ids: np.ndarray) -> np.ndarray:
        """Append `ids` to `sequence` at the next steps; the logits [vocab] of the last one. Ids
        are checked here, so one request's bad ids never fail the others' step."""
        ask = _Ask(sequence, token_ids(ids, self.capabilities))
        if not len(ask.ids):
            raise PromptError("nothing to run: no token ids")
        with self._cond:
            if self._closed:
                raise RuntimeError("the batch is closed")
            alone = self._running <= 1 and not self._asks
            if not alone:
                self._asks[sequence] = ask
                self._cond.notify_all()
        if alone:  # the only request: step on this thread, without two thread hand-offs per token
            return self._step_alone(ask)
        ask.answered.wait()
        if ask.error is not None:
            raise ask.error
        assert ask.logits is not None
        return ask.logits

    def _step_alone(self, ask: _Ask) -> np.ndarray:
        with self._runtime:  # a request that starts meanwhile waits here in the scheduler's step
            for start in range(0, len(ask.ids), self.batch.n_batch):
                logits = self.batch.step([(ask.sequence, ask.ids[start : start + self.batch.n_batch])])
                self._on_step(1)
        return np.array(logits[0])

    def truncate(self, sequence: int, length: int) -> None:
        with self._runtime:
            self.batch.truncate(sequence, length)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self.batch.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._asks or self._closed)
                if self._closed:
                    for ask in self._asks.values():
                        ask.error = RuntimeError("the batch was closed")
                        ask.answered.set()
                    return
                deadline = time.monotonic() + max(self.gather_s, GATHER_SHARE * self._last_step_s)
                while len(self._asks) < self._running and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cond.wait(left):
                        break
                work = self._plan()
            self._step(work)

    def _plan(self) -> list[tuple[_Ask, np.ndarray]]:
        """This step's chunks: single generated tokens first, then prompt chunks while the
        runtime's batch has room (a prompt longer than that continues next step)."""
        room, work = self.batch.n_batch, []
        for ask in sorted(self._asks.values(), key=lambda a: len(a.ids) - a.done_tokens):
            if room == 0:
                break
            chunk = ask.ids[ask.done_tokens : ask.done_tokens + room]
            work.append((ask, chunk))
            room -= len(chunk)
        return work

    def _step(self, work: list[tuple[_Ask, np.ndarray]]) -> None:
        try:
            with self._runtime:
                started = time.monotonic()
                logits = self.batch.step([(ask.sequence, chunk) for ask, chunk in work])
                self._last_step_s = time.monotonic() - started
        except BaseException as err:  # noqa: BLE001 — raised again in each waiting request
            with self._cond:
                for ask, _ in work:
                    ask.error = err
                    self._asks.pop(ask.sequence, None)
                    ask.answered.set()
            return
        self._on_step(len(work))
        with self._cond:
            for row, (ask, chunk) in enumerate(work):
                ask.done_tokens += len(chunk)
                if ask.done_tokens == len(ask.ids):
                    ask.logits = np.array(logits[row])
                    self._asks.pop(ask.sequence, None)
                    ask.answered.set()


class BatchedSequence:
    """One sequence of a StepScheduler's batch, as an edgelm Session for the generation loop.

    `prefill` returns the last position's logits only ([1, vocab]): the batch computes no
    others (a server needs no more), so this session is for generating, not for parity."""

    def __init__(self, scheduler: StepScheduler, index: int) -> None:
        self._scheduler, self.index = scheduler, index
        self.capabilities = scheduler.capabilities

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._scheduler.ask(self.index, ids)[None]

    def decode(self, token_id: int) -> np.ndarray:
        return self._scheduler.ask(self.index, np.array([token_id], dtype=np.int64))

    def reset(self) -> None:
        self._scheduler.truncate(self.index, 0)

    def truncate(self, length: int) -> None:
        self._scheduler.truncate(self.index, length)

    def close(self) -> None:
        """The batch is closed with its scheduler."""
