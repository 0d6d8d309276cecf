"""Run an untrusted artifact's session in a child process, where a native crash costs nothing.

Some vendor runtimes end the whole process on a damaged file instead of raising: ExecuTorch
aborts (std::terminate on a delegate error whose message is not UTF-8, ET_CHECK on a wrong
value type) and reads out of bounds on some programs its own verification accepts, llama.cpp
aborts on GGML_ASSERTs in its loader, LiteRT segfaults on some tensor tables that pass its
own checks (all found by tests/test_fuzz.py). No try/except can catch that, and a check run
beforehand covers only the inputs it runs (an out-of-bounds read may depend on the memory
layout of the process it happens in). So these runtimes never run a file this process did
not write itself: the session lives in a child process and `IsolatedSession` forwards
prefill/decode/run to it. A crash, an abort or a hang there is an InvalidModelError here.

Children are forked from one small "fork server" process per caller (started on first use,
under an address-space limit, with the runtime's libraries already imported), so a session
starts in milliseconds plus the file's own load, in a fresh process that has run nothing
else. A step costs one round trip over a socket pair (the logits travel as .npy bytes, no
pickle) — under a millisecond beside a decode step.

Files this process wrote itself (the exporter's artifacts, opened right after for parity,
identified by path, inode, size and mtime) are opened in-process.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgelm import errors
from edgelm.background import die_with_parent
from edgelm.errors import EdgeLMError, InvalidModelError
from edgelm.session import Capabilities

CHILD_VARIABLE = "EDGELM_ISOLATED_CHILD"  # set in the fork server and its children: they open files directly
CALL_TIMEOUT_S = 600  # the longest one open or step may take before the child is killed as hung
ADDRESS_SPACE = 32 << 30
_HEADER = struct.Struct("<Q")
_written_here: set[tuple[str, int, int, int]] = set()


def _identity(path: Path) -> tuple[str, int, int, int]:
    info = path.stat()
    return str(path.resolve()), info.st_ino, info.st_size, info.st_mtime_ns


def mark_trusted(path: Path) -> None:
    """Record a file this process wrote itself, so opening it needs no child process."""
    _written_here.add(_identity(Path(path)))


def runs_here(path: Path) -> bool:
    """Whether `path` may be opened in this process: it wrote the file, or it is an isolation child."""
    return bool(os.environ.get(CHILD_VARIABLE)) or _identity(Path(path)) in _written_here


# ---- the wire: length-prefixed frames, a JSON header then the raw arrays it describes ----

_DTYPES = ("float32", "float16", "int64", "int32")  # what sessions take and give; nothing else is read


class _Gone(Exception):
    """The other end closed (the child died) or did not answer in time (`hung`)."""

    def __init__(self, message: str, hung: bool = False) -> None:
        super().__init__(message)
        self.hung = hung


def _send(sock: socket.socket, header: dict, arrays: tuple[np.ndarray, ...] = ()) -> None:
    arrays = tuple(np.ascontiguousarray(a) for a in arrays)
    described = [[a.dtype.name, list(a.shape)] for a in arrays]
    text = json.dumps({**header, "arrays": described}).encode()
    parts: list[bytes | memoryview] = [_HEADER.pack(len(text)), text]
    for array in arrays:
        parts += [_HEADER.pack(array.nbytes), memoryview(array).cast("B")]
    sock.settimeout(None)
    sent = sock.sendmsg(parts)  # one system call for a whole step's message, as a rule
    total = sum(len(part) for part in parts)
    if sent < total:
        sock.sendall(b"".join(bytes(part) for part in parts)[sent:])


def _read_exactly(sock: socket.socket, size: int, timeout: float | None) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    sock.settimeout(timeout)
    while got < size:
        try:
            count = sock.recv_into(view[got:])
        except TimeoutError:
            raise _Gone(f"no answer in {timeout:.0f} s", hung=True) from None
        if not count:
            raise _Gone("its process ended")
        got += count
    return buffer


def _receive(sock: socket.socket, timeout: float | None = None) -> tuple[dict, list[np.ndarray]]:
    def frame() -> bytearray:
        return _read_exactly(sock, _HEADER.unpack(_read_exactly(sock, _HEADER.size, timeout))[0], timeout)

    header = json.loads(frame())
    arrays = []
    for dtype, shape in header.pop("arrays", []):
        if dtype not in _DTYPES:
            raise _Gone(f"it sent an array of {dtype!r}")
        arrays.append(np.frombuffer(frame(), dtype=dtype).reshape(shape))
    return header, arrays


def _error_header(err: BaseException) -> dict:
    if isinstance(err, MemoryError):
        err = InvalidModelError(
            f"the runtime needs more memory than the isolation limit ({ADDRESS_SPACE >> 30} GB of address space) allows"
        )
    return {"error": [type(err).__name__, str(err)]}


def _raise_error(name: str, message: str) -> None:
    """Raise what the child raised, as the same class where it is edgelm's or Python's own."""
    cls = getattr(errors, name, None) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        raise cls(message)
    raise RuntimeError(f"{name}: {message}")  # some library's own exception type: a bug to see, exit 3


# ---- the session in the caller ----


class _IsolatedBase:
    """The caller's end of one child process that holds one session."""

    def __init__(self, sock: socket.socket, runtime: str, path: Path, capabilities: Capabilities, pid: int) -> None:
        self._sock, self._runtime, self._path, self._pid = sock, runtime, path, pid
        self.capabilities = capabilities
        self._lock = threading.Lock()

    def _call(self, header: dict, *arrays: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            if self._sock is None:
                raise InvalidModelError(f"{self._path}: this session is closed (or its {self._runtime} process ended)")
            try:
                _send(self._sock, header, arrays)
                answer, results = _receive(self._sock, CALL_TIMEOUT_S)
            except (_Gone, OSError) as err:  # OSError: a reset or broken connection, the child is gone
                self._end(hung=isinstance(err, _Gone) and err.hung)
                why = err if isinstance(err, _Gone) else "its process ended"
                raise InvalidModelError(
                    f"{self._path}: {self._runtime} failed running it in its own process "
                    f"({why}); the file is damaged or not an edgelm artifact — re-export it"
                ) from None
        if "error" in answer:
            _raise_error(*answer["error"])
        return results

    def _end(self, hung: bool = False) -> None:
        """Close the socket (the child exits when it reads its end); kill a child that hangs. Only
        a live child is signalled: an exited one's PID may already belong to another process."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if hung:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)

    def close(self) -> None:
        with self._lock:
            self._end()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()  # the child sees the end of its socket and exits


class IsolatedSession(_IsolatedBase):
    """A decoder session whose runtime runs in a child process (edgelm.session.Session)."""

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._call({"call": "prefill"}, np.asarray(ids, dtype=np.int64))[0]

    def decode(self, token_id: int) -> np.ndarray:
        return self._call({"call": "decode", "token": int(token_id)})[0]

    def reset(self) -> None:
        self._call({"call": "reset"})

    def truncate(self, length: int) -> None:
        self._call({"call": "truncate", "length": int(length)})


class IsolatedEncoderSession(_IsolatedBase):
    """An encoder session whose runtime runs in a child process (edgelm.session.EncoderSession)."""

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._call(
            {"call": "run"}, np.asarray(input_ids, dtype=np.int64), np.asarray(attention_mask, dtype=np.int64)
        )[0]


class IsolatedBatch(_IsolatedBase):
    """Several sequences advanced together (e.g. edgelm.runtimes.llamacpp.LlamaCppBatch) in a child process."""

    def __init__(self, *args: Any, sequences: int, n_batch: int) -> None:
        super().__init__(*args)
        self.sequences, self.n_batch = sequences, n_batch

    def step(self, work: list[tuple[int, np.ndarray]]) -> np.ndarray:
        ids = [np.asarray(chunk, dtype=np.int64).reshape(-1) for _, chunk in work]
        plan = [[int(sequence), len(chunk)] for (sequence, _), chunk in zip(work, ids)]
        return self._call({"call": "step", "plan": plan}, np.concatenate(ids))[0]

    def truncate(self, sequence: int, length: int) -> None:
        self._call({"call": "truncate", "sequence": int(sequence), "length": int(length)})


def _step(batch: Any, plan: list[list[int]], ids: np.ndarray) -> np.ndarray:
    """The child's end of IsolatedBatch.step: the concatenated ids cut back into the plan's chunks."""
    ends = np.cumsum([n for _, n in plan])
    if not plan or ends[-1] != len(ids):
        raise ValueError("a step's plan does not match its ids")
    return batch.step([(int(seq), chunk) for (seq, _), chunk in zip(plan, np.split(ids, ends[:-1]))])


def open_isolated(
    runtime: str, path: Path, device: str = "cpu", threads: int | None = None, sequences: int | None = None
) -> IsolatedSession | IsolatedEncoderSession | IsolatedBatch:
    """Open `path` with `runtime` in a fresh child process; its errors are raised here as they were there.
    `sequences`: a batch of that many sequences (the runtime's open_batch) instead of a session."""
    path = Path(path)
    case = {"runtime": runtime, "path": str(path.resolve()), "device": device, "threads": threads}
    sock = _SERVER.fork_session({**case, "sequences": sequences})
    pid = None
    try:
        pid = int(_receive(sock, CALL_TIMEOUT_S)[0]["pid"])  # the child's first word, before it reads the file
        answer, _ = _receive(sock, CALL_TIMEOUT_S)
    except (_Gone, OSError) as err:
        sock.close()
        if pid is not None and isinstance(err, _Gone) and err.hung:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        why = err if isinstance(err, _Gone) else "its process ended"
        raise InvalidModelError(
            f"{path}: {runtime} could not open it in its own process ({why}); the file is "
            "damaged or not an edgelm artifact — re-export it"
        ) from None
    if "error" in answer:
        sock.close()
        _raise_error(*answer["error"])
    facts = answer["capabilities"]
    capabilities = Capabilities(**facts)
    if answer["kind"] == "batch":
        return IsolatedBatch(sock, runtime, path, capabilities, pid, sequences=sequences, n_batch=answer["n_batch"])
    kind = IsolatedEncoderSession if answer["kind"] == "encoder" else IsolatedSession
    return kind(sock, runtime, path, capabilities, pid)


def exercise(session: Any) -> None:
    """A short prefill and two decode steps (the ids generation would feed), or an encoder batch."""
    if hasattr(session, "prefill"):
        session.reset()
        logits = session.prefill(np.array([1, 2, 0], dtype=np.int64))
        vocab = logits.shape[-1]
        session.decode(int(np.argmax(logits[-1])) % vocab)
        session.decode(vocab - 1)
    else:
        ids = np.ones((1, 4), dtype=np.int64)
        session.run(ids, np.ones_like(ids))


def probe(runtime: str, path: Path) -> None:
    """Open and run `path` in a child first, for code that must then open it in this process
    (a vendor's own runtime, a describer): InvalidModelError if that fails or dies there."""
    path = Path(path)
    if runs_here(path):
        return
    try:
        session = open_isolated(runtime, path, threads=1)
        try:
            exercise(session)
        finally:
            session.close()
    except EdgeLMError as err:
        raise InvalidModelError(
            f"{path}: {runtime} could not open and run it ({' '.join(str(err).split())[:300]})"
            "; the file is damaged or not an edgelm artifact — re-export it"
        ) from None
    except Exception as err:  # noqa: BLE001  whatever the runtime raised on this file, it refused it
        raise InvalidModelError(
            f"{path}: {runtime} could not open and run it ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}); the file is damaged — re-export it"
        ) from None


# ---- the fork server and its children ----

_SERVER_SOURCE = "from edgelm.isolation import _serve_forks; _serve_forks()"


class _ForkServer:
    """The caller's side of the fork server: one process per caller, restarted if it ends."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = {
            **os.environ,
            CHILD_VARIABLE: "1",
            "EDGELM_ISOLATION_FD": str(theirs.fileno()),
            "EDGELM_ISOLATION_LIMIT": str(ADDRESS_SPACE),
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SOURCE],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self._control = ours
        atexit.register(self._proc.kill)

    def fork_session(self, case: dict) -> socket.socket:
        """A socket connected to a new child that opens `case` and then serves its session."""
        ours, theirs = socket.socketpair()
        with self._lock:
            for attempt in (1, 2):  # a server that ended (killed from outside) is started once more
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                try:
                    socket.send_fds(self._control, [json.dumps(case).encode()], [theirs.fileno()])
                    break
                except OSError:
                    self._proc.kill()
                    self._proc = None
                    if attempt == 2:
                        raise
        theirs.close()
        return ours


def _serve_forks() -> None:
    """The fork server: imports the runtimes once, then forks one child per session request."""
    import resource

    die_with_parent()
    limit = int(os.environ["EDGELM_ISOLATION_LIMIT"])
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    control = socket.socket(fileno=int(os.environ["EDGELM_ISOLATION_FD"]))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    _preload()
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, 1)
        except OSError:
            return
        if not message:
            return  # the caller ended
        if os.fork() == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            die_with_parent()
            status = 0
            try:
                _serve_session(socket.socket(fileno=fds[0]), json.loads(message))
            except BaseException:  # noqa: BLE001  a child never returns into the server's loop
                status = 1
            os._exit(status)
        for fd in fds:
            os.close(fd)


def _preload() -> None:
    """Import what the isolated runtimes need before forking, so each child starts fast."""
    from edgelm.session import RUNTIME_MODULES, get_runtime

    for name in ISOLATED_RUNTIMES:
        if name in RUNTIME_MODULES:
            try:
                get_runtime(name).preload()
            except (EdgeLMError, ImportError):
                pass  # not installed: a request for it fails in its child with the usual message


def _serve_session(sock: socket.socket, case: dict) -> None:
    from edgelm.session import get_runtime

    _send(sock, {"pid": os.getpid()})
    try:
        runtime, where = get_runtime(case["runtime"]), Path(case["path"])
        if case.get("sequences") is not None:
            session = runtime.open_batch(where, case["sequences"], case["device"], case["threads"])
        else:
            session = runtime.open(where, case["device"], case["threads"])
    except BaseException as err:  # noqa: BLE001  sent back, raised again in the caller
        _send(sock, _error_header(err))
        return
    kind = "batch" if hasattr(session, "step") else "decoder" if hasattr(session, "prefill") else "encoder"
    facts = {"kind": kind, "capabilities": asdict(session.capabilities)}
    _send(sock, {**facts, "n_batch": session.n_batch} if kind == "batch" else facts)
    if kind == "batch":
        _serve_calls(sock, _batch_calls(session))
    else:
        _serve_calls(sock, _session_calls(session))


def _batch_calls(batch: Any) -> dict[str, Any]:
    return {
        "step": lambda h, a: (_step(batch, h["plan"], a[0]),),
        "truncate": lambda h, a: batch.truncate(int(h["sequence"]), int(h["length"])) or (),
    }


def _session_calls(session: Any) -> dict[str, Any]:
    return {
        "prefill": lambda h, a: (session.prefill(a[0]),),
        "decode": lambda h, a: (session.decode(h["token"]),),
        "reset": lambda h, a: session.reset() or (),
        "truncate": lambda h, a: session.truncate(int(h["length"])) or (),
        "run": lambda h, a: (session.run(a[0], a[1]),),
    }


def _serve_calls(sock: socket.socket, calls: dict[str, Any]) -> None:
    """Answer the caller's calls until it closes its end."""
    while True:
        try:
            header, arrays = _receive(sock)
        except _Gone:
            return
        try:
            results = calls[header["call"]](header, arrays)
        except BaseException as err:  # noqa: BLE001
            _send(sock, _error_header(err))
            continue
        _send(sock, {}, tuple(np.asarray(r) for r in results))


# Runtimes whose native code can end the process on a damaged file: their adapters open files
# this process did not write through open_isolated (one line each, checked by the tests).
ISOLATED_RUNTIMES = ("executorch", "llama.cpp", "litert")

_SERVER = _ForkServer()
