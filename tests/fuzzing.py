"""Byte-mutation fuzzing of every format parser edgelm exposes, each case in a child process.

A `Worker` is a child Python process under an address-space limit (RLIMIT_AS) that takes
one case at a time over a pipe: inspect a mutated file, open it in its runtime and run a
short prefill/decode, or load a bundle whose manifest was mutated. Whatever a vendor's
native code does with the bytes (segfault, abort, runaway allocation), the caller only sees
the outcome:

- ``ok``       the mutant still parsed and ran (a mutation in weights or padding);
- ``refused``  an EdgeLMError (what bad input must give: one line, exit 2);
- ``bug``      any other exception (what the CLI would turn into exit 3);
- ``crash``    the child died by a signal or ran out of its address space;
- ``hang``     no answer within the case timeout;
- ``canary``   a file outside the bundle was read into the output, or changed.

`tests/test_fuzz.py` runs a few hundred cases per parser in CI; `benchmarks/fuzz_parsers.py`
runs ≥ 10,000 per parser and records the counts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ADDRESS_SPACE_LIMIT = 12 << 30  # torch and the runtimes reserve a few GB of address space at import
CASE_TIMEOUT_S = 60.0
CANARY = "EDGELM-CANARY-7f3a9c"
BAD_OUTCOMES = ("bug", "crash", "hang", "canary")

# parser name -> (artifact format in the bundle, what the worker does with a mutant)
PARSERS: dict[str, tuple[str, str]] = {
    "gguf": ("gguf", "artifact"),
    "onnx": ("onnx", "artifact"),
    "tflite": ("tflite", "artifact"),
    "executorch": ("executorch", "artifact"),
    "safetensors": ("safetensors", "artifact"),
    "manifest": ("manifest", "bundle"),
}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One mutant: bit flips, interesting values, truncation, a zeroed or duplicated span.

    Most mutations land in the first 64 KB, where every format keeps its header, tables
    and offsets; the rest hit anywhere.
    """
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        head = min(len(out), 65536) if rng.random() < 0.8 else len(out)
        if not out:
            break
        pos = rng.randrange(head)
        kind = rng.randrange(6)
        if kind == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[pos] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)))
        elif kind == 2:  # an interesting 32/64-bit integer (counts, lengths, offsets)
            value = rng.choice((0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 1 << 20, rng.getrandbits(32)))
            width = rng.choice((4, 8))
            out[pos : pos + width] = value.to_bytes(width, "little")
        elif kind == 3:
            del out[rng.randrange(len(out)) :]
        elif kind == 4:
            end = min(len(out), pos + rng.randrange(1, 256))
            out[pos:end] = bytes(end - pos)
        else:
            span = bytes(out[pos : pos + rng.randrange(1, 64)])
            where = rng.randrange(len(out))
            out[where:where] = span
    return bytes(out)


def mutate_text(text: str, rng: random.Random, outside: str = "/etc/hostname") -> bytes:
    """A mutant of a JSON text: byte mutations half the time, structural edits the other half
    (a value replaced by an edge case, or by `outside`, a path to a file outside the bundle)."""
    if rng.random() < 0.5:
        return mutate(text.encode(), rng)
    data = json.loads(text)
    paths: list[tuple[list, object]] = []

    def walk(node: object, path: list) -> None:
        paths.append((path, node))
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*path, k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, [*path, i])

    walk(data, [])
    path, _ = rng.choice(paths[1:] or paths)
    replacement = rng.choice(
        (
            None,
            -1,
            0,
            2**70,
            1e308,
            "",
            "../../outside",
            outside,
            "../canary.txt",
            [],
            {},
            True,
            "x" * 1000,
            [[[[[]]]]],
            "tokenizer/../../x",
            "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
        )
    )
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.2:
        parent.pop(path[-1])
    else:
        parent[path[-1]] = replacement
    return json.dumps(data).encode()


# The child: reads one JSON case per line, answers one JSON line. Kept as source text so it
# runs as `python -c` with nothing from the tests folder on its path.
WORKER_SOURCE = r"""
import json, os, resource, sys, traceback
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
answers = os.fdopen(os.dup(1), "w")  # native libraries print to fd 1: answers get their own descriptor
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
import numpy as np
import edgelm
from edgelm.errors import EdgeLMError
from edgelm.inspect import describe
from edgelm.session import get_runtime
canary = sys.argv[2]

def artifact(case):
    path = case["path"]
    text = str(describe(path))
    runtime = get_runtime(case["runtime"])
    session = runtime.open(__import__("pathlib").Path(path), threads=1)
    try:
        if hasattr(session, "prefill"):
            session.reset()
            logits = session.prefill(np.array([1, 2, 3], dtype=np.int64))
            session.decode(int(np.argmax(logits[-1])) % max(1, logits.shape[-1]))
        else:
            session.run(np.array([[1, 2, 3]], dtype=np.int64), np.ones((1, 3), dtype=np.int64))
    finally:
        session.close()
    return text

def bundle(case):
    text = str(describe(case["path"]))
    lm = edgelm.load(case["path"], threads=1)
    try:
        if hasattr(lm, "generate"):
            text += lm.generate("The parity text", max_new_tokens=2)
        else:
            text += str(lm.embed("The parity text"))
    finally:
        lm.close()
    return text

for line in sys.stdin:
    case = json.loads(line)
    try:
        text = (artifact if case["kind"] == "artifact" else bundle)(case)
        answer = {"outcome": "canary" if canary in text else "ok"}
    except EdgeLMError as err:
        message = str(err)
        answer = {"outcome": "canary" if canary in message else "refused", "message": message[:300]}
    except MemoryError:
        answer = {"outcome": "crash", "message": "MemoryError: past the address-space limit"}
    except BaseException as err:
        answer = {"outcome": "bug", "message": f"{type(err).__name__}: {str(err)[:300]}",
                  "trace": traceback.format_exc()[-1500:]}
    answers.write(json.dumps(answer) + "\n")
    answers.flush()
"""


class Worker:
    """One child process that runs cases until it dies; restarted transparently."""

    def __init__(self, limit: int = ADDRESS_SPACE_LIMIT, timeout: float = CASE_TIMEOUT_S):
        self.limit, self.timeout = limit, timeout
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "EDGELM_LLAMA_LOG": ""}
        return subprocess.Popen(
            [sys.executable, "-c", WORKER_SOURCE, str(self.limit), CANARY],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def run(self, case: dict) -> dict:
        import selectors

        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        try:
            proc.stdin.write(json.dumps(case) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        ready = selector.select(self.timeout + (20 if case.get("first") else 0))
        selector.close()
        if not ready:
            self.close()
            return {"outcome": "hang", "message": f"no answer in {self.timeout:.0f} s"}
        line = proc.stdout.readline()
        if not line:
            return self._died()
        return json.loads(line)

    def _died(self) -> dict:
        code = self.proc.wait() if self.proc else None
        self.proc = None
        return {"outcome": "crash", "message": f"child exited with {code}"}

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@dataclass
class FuzzResult:
    parser: str
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # bad outcome -> first messages
    seconds: float = 0.0

    @property
    def bad(self) -> int:
        return sum(self.outcomes[o] for o in BAD_OUTCOMES)

    def to_dict(self) -> dict:
        return {
            "parser": self.parser,
            "cases": self.cases,
            "outcomes": dict(self.outcomes),
            "bad": self.bad,
            "examples": self.examples,
            "seconds": round(self.seconds, 1),
        }


def fuzz_parser(
    bundle: Path, parser: str, cases: int, scratch: Path, seed: int = 0, worker: Worker | None = None
) -> FuzzResult:
    """Run `cases` mutants of one parser's file from `bundle`; every case in a child process."""
    from edgelm.bundle import read_bundle

    manifest = read_bundle(bundle)
    fmt, kind = PARSERS[parser]
    rng = random.Random(f"{parser}-{seed}")
    own_worker = worker is None
    worker = worker or Worker()
    result = FuzzResult(parser)
    scratch.mkdir(parents=True, exist_ok=True)
    canary = scratch / "canary.txt"
    canary.write_text(CANARY + "\n")
    started = time.monotonic()
    try:
        if kind == "artifact":
            entry = next(a for a in manifest.artifacts if a.format == fmt or a.runtime == fmt)
            original = (bundle / entry.path).read_bytes()
            target = scratch / Path(entry.path).name
            case = {"kind": "artifact", "path": str(target), "runtime": entry.runtime}
        else:
            copy = scratch / "bundle"
            if copy.exists():
                shutil.rmtree(copy)
            shutil.copytree(bundle, copy)
            original_text = (bundle / "manifest.json").read_text()
            target = copy / "manifest.json"
            case = {"kind": "bundle", "path": str(copy)}
        for i in range(cases):
            target.write_bytes(
                mutate(original, rng) if kind == "artifact" else mutate_text(original_text, rng, str(canary))
            )
            answer = worker.run({**case, "first": i == 0})
            outcome = answer["outcome"]
            if canary.read_text() != CANARY + "\n":
                outcome = "canary"
                canary.write_text(CANARY + "\n")
            result.outcomes[outcome] += 1
            if outcome in BAD_OUTCOMES and len(result.examples.setdefault(outcome, [])) < 5:
                keep = scratch / f"{outcome}-{i}{target.suffix}"
                shutil.copy(target, keep)
                result.examples[outcome].append(f"{keep.name}: {answer.get('message', '')} {answer.get('trace', '')}")
            result.cases += 1
    finally:
        if own_worker:
            worker.close()
    result.seconds = time.monotonic() - started
    return result
