"""One run per output: a lock file held while a command writes a workdir or a results path.

:func:`hold` takes ``<lock path>`` for the duration of a ``with`` block. The file holds the
owner's pid, host and start time (JSON) and is held with an exclusive ``flock``: the kernel
drops it when the owner dies, however it dies. A second run does not wait: it is refused with
one line naming the holder and how to clear a stale lock. A lock file left by a killed
process (its ``flock`` gone: a dead pid on this host) is taken over, said on stderr. A holder
on another host sharing the folder is judged by age: its owner touches the file every
``HEARTBEAT_S`` seconds, and one untouched for ``STALE_S`` seconds is taken over too.

The lock file is removed when the block ends, on an exception or Ctrl-C as well. Paths on a
remote file system (``gs://...``) are not locked. A process that holds a lock may take it
again (nested ``hold`` calls on one path count up).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from vtm_jax.errors import UserError

HEARTBEAT_S = 60.0
STALE_S = 600.0
_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth


@contextlib.contextmanager
def hold(path: str | None, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` while the block runs; ``what`` names the locked output in
    the message a second run gets (``"--workdir runs/a"``). ``path`` None: no lock."""
    if path is None or "://" in path:
        yield
        return
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(path, what)
    _HELD[key] = 1
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        del _HELD[key]
        _release(path, fd)


def holder(path: str) -> dict[str, Any] | None:
    """What the lock file ``path`` says of its owner; None when there is none or it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _acquire(path: str, what: str) -> int:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(_busy(path, what, holder(path))) from None
        except OSError:
            locked = False  # a file system without flock: the file's contents decide alone
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it as it ended: lock the file that is there now
    previous = holder(path)
    if previous is not None:
        try:
            _check_stale(path, what, previous, locked)
        except UserError:
            os.close(fd)
            raise
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv[:2]),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    os.fsync(fd)
    return fd


def _check_stale(path: str, what: str, previous: dict[str, Any], locked: bool) -> None:
    """A lock file whose ``flock`` is free (``locked``): its owner is gone, or on another host
    (judged by age). Without ``flock``, an owner on this host is gone when its pid is."""
    host = socket.gethostname()
    if not locked and previous.get("host") == host and _alive(previous.get("pid")):
        raise UserError(_busy(path, what, previous))
    if previous.get("host") != host:
        age = time.time() - os.stat(path).st_mtime
        if age < STALE_S:
            raise UserError(_busy(path, what, previous))
        gone = f"untouched for {age:.0f} s"
    elif previous.get("pid") == os.getpid():
        gone = "an earlier lock of this process"
    else:
        gone = "that process is gone"
    print(
        f"vtm-jax: taking over the stale lock {path} of {_who(previous)} ({gone})",
        file=sys.stderr,
    )


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def _who(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "an unknown process"
    return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"


def _busy(path: str, what: str, owner: dict[str, Any] | None) -> str:
    return (
        f"{what} is in use by another vtm-jax run: {_who(owner)} (lock file {path}); "
        f"wait for it to end, or, if that process is gone, delete {path}"
    )


def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def _release(path: str, fd: int) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        os.unlink(path)  # before the flock goes: a waiting run then locks a new file
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
