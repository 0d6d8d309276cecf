"""Folders edgelm builds beside a destination, and the one atomic swap that puts them in place.

A long job (an export) writes into `.NAME.partial-<owner>-<random>` beside the destination
and then swaps it in with one `renameat2` call: `RENAME_NOREPLACE` when nothing is there
(a folder someone created meanwhile is refused, never replaced), `RENAME_EXCHANGE` when an
existing bundle is replaced (old and new trade places atomically, so the path always holds
one complete bundle; the old one then sits under the staging name and is deleted).

`<owner>` is the writing process's PID and start time. A process killed at any point leaves
at most staging folders under such names; `clean_stale` removes those of processes that are
no longer alive (a PID reused by another process has another start time) and never those
of a live one. Where the filesystem has no `renameat2` (rare: some network and FUSE
mounts), the swap falls back to two renames with the old bundle restored on failure, and a
kill between them is repaired on the next run (the old bundle is renamed back).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from edgelm.errors import BundleError

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _libc_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the kernel or filesystem lacks it. OSError otherwise."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def owner_tag(pid: int | None = None) -> str:
    """`<pid>-<start time in ms>`: names this process uniquely, even after its PID is reused."""
    process = psutil.Process(pid)
    return f"{process.pid}-{int(process.create_time() * 1000)}"


def host_tag() -> str:
    """A short stable id of this machine, for staging names written on another device."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def owner_alive(pid: int, started_ms: int) -> bool:
    """Whether the process that wrote a staging name still runs (same PID and start time)."""
    try:
        process = psutil.Process(pid)
        return abs(int(process.create_time() * 1000) - started_ms) <= 1
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def staging_pattern(name: str) -> re.Pattern[str]:
    """Names of staging folders for a destination called `name`: (kind, pid, start ms)."""
    return re.compile(rf"^\.{re.escape(name)}\.(partial|old)-(\d+)-(\d+)-[0-9a-f]+$")


def make_staging(destination: Path, kind: str = "partial") -> Path:
    """Create an empty staging folder beside `destination`, named after this process."""
    path = destination.with_name(f".{destination.name}.{kind}-{owner_tag()}-{secrets.token_hex(4)}")
    path.mkdir()
    return path


@contextmanager
def scratch_beside(destination: Path) -> Iterator[Path]:
    """A staging folder beside `destination` for intermediate work, removed afterwards
    (by the next run's clean_stale if this process is killed)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(destination)
    path = make_staging(destination)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(destination: Path) -> list[Path]:
    """Remove staging folders beside `destination` left by dead processes; return them.

    An `.old` folder (a replaced bundle, only in the two-rename fallback) is renamed back
    to `destination` when nothing is there, since a kill between the renames left it so.
    """
    parent, pattern = destination.parent, staging_pattern(destination.name)
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in sorted(entries):
        match = pattern.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        kind, pid, started = match.group(1), int(match.group(2)), int(match.group(3))
        if owner_alive(pid, started):
            continue  # a running export or push: never touch its folders
        if kind == "old" and not os.path.lexists(destination):
            try:
                entry.rename(destination)
                continue
            except OSError:
                pass
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def move_into_place(work: Path, destination: Path, *, replace_existing: bool) -> Path | None:
    """Put the finished `work` folder at `destination` atomically.

    Without replace_existing, a destination that exists (even one created while the job
    ran) is an error and is left alone. With it, the existing folder and `work` trade
    places; the replaced folder's new path is returned for the caller to delete.
    """
    if not os.path.lexists(destination):
        try:
            if _rename2(work, destination, _RENAME_NOREPLACE):
                return None
        except FileExistsError:
            pass  # created between the check and the rename: handled below
        if not os.path.lexists(destination):
            os.rename(work, destination)  # fallback: the existence check above is the best there is
            return None
        # something appeared at the destination between the two checks: fall through
    if not replace_existing:
        raise BundleError(
            f"{destination} appeared while edgelm was writing; it was left as it is (pass --overwrite "
            "to replace a bundle, or choose another output)"
        )
    if _rename2(work, destination, _RENAME_EXCHANGE):
        return work  # work now holds the old bundle
    old = destination.with_name(f".{destination.name}.old-{owner_tag()}-{secrets.token_hex(4)}")
    os.rename(destination, old)
    try:
        os.rename(work, destination)
    except BaseException:
        os.rename(old, destination)
        raise
    return old
