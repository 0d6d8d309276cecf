"""Named export steps, timed: where an export's minutes go, for the report's step table.

`export_bundle` runs every stage inside `step(name)` so the CLI can draw progress; a
`StepClock` wraps that hook (or none) and also records each step's wall time, so the bundle
says what took long without anyone re-running it under a profiler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

StepHook = Callable[[str], AbstractContextManager[Any]]


@dataclass(frozen=True)
class StepTime:
    step: str
    seconds: float
    depth: int = 0  # 1 for a step run inside another (its time is also in the outer step's)
    background: bool = False  # ran in a second process beside the other steps (not in the total)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepClock:
    """A step hook that times every step and passes it on to `hook` (the CLI's progress display).

    `note` is forwarded too, so long steps keep their live detail.
    """

    def __init__(self, hook: StepHook | None = None) -> None:
        self._hook = hook or (lambda _name: nullcontext())
        self._open = 0
        self.times: list[StepTime] = []
        if hasattr(hook, "note"):
            self.note = hook.note  # type: ignore[union-attr]

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, depth = time.perf_counter(), self._open
        self._open += 1
        try:
            with self._hook(name):
                yield
        finally:
            self._open -= 1
            self.times.append(StepTime(name, round(time.perf_counter() - start, 2), depth))

    def record_background(self, name: str, seconds: float) -> None:
        """A step that ran in another process (edgelm.background), beside the steps timed here."""
        self.times.append(StepTime(name, round(seconds, 2), background=True))

    def total_s(self) -> float:
        return round(sum(t.seconds for t in self.times if t.depth == 0 and not t.background), 2)

    def to_list(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.times]
