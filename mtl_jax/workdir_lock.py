"""One training run per workdir: an OS lock the kernel releases when its holder dies.

Two ``mtl-jax train`` on one workdir (a job submitted twice, a requeue while the old job
still runs) would interleave their checkpoints and append the same steps twice to
``metrics.jsonl``. :func:`hold_workdir` takes a non-blocking exclusive ``flock`` on
``<workdir>/.lock`` for as long as training runs; a second holder fails at once with a
:class:`UserError` naming the first (pid, host, since when, command).

The lock is the kernel's, not the file's existence: a process killed with SIGKILL, by the
OOM killer or a power loss holds nothing, so its rerun starts without any clean-up (the
stale file is simply reused). The file holds the holder as JSON for the message only.
Readers (``eval``, ``predict``, ``embed``, ``export``) never take it: they read the newest
complete checkpoint, which Orbax only ever renames into place.

A lock on a file only guards that file: deleting the run directory (or moving it) while
its run is alive, and starting another run there, would give both processes a lock on
different files and one path to write. :func:`check_held` sees that the lock file the path
names is no longer the one this process locked; ``mtl-jax train`` asks it after every step,
before anything of that step is written, and stops with one clean error.

On release the file is removed while still locked; a process that opened the old file in
the meantime sees, after its own ``flock``, that the path no longer names the inode it
locked, and tries again on the new file (the usual unlink-safe lock protocol).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtl_jax.errors import UserError

LOCK_FILE = ".lock"


def read_holder(workdir: str | Path) -> dict[str, Any]:
    """What the lock file says about its holder (``{}`` when missing or unreadable)."""
    try:
        data = json.loads((Path(workdir) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _busy_message(workdir: Path, holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since, command = holder.get("since", "?"), holder.get("command", "train")
    return (
        f"{workdir}: another '{command}' is using this run directory (pid {pid} on host "
        f"{host}, since {since}); wait for it to end or stop it (kill {pid} on {host}), then "
        "rerun to resume, or use a new --workdir"
    )


def _open_locked(path: Path) -> int:
    """An open descriptor holding ``LOCK_EX`` on the file ``path`` names right now."""
    for _ in range(100):  # each retry means a holder released (and removed) the file
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BlockingIOError(exc.errno, "locked") from None
            raise
        if _names(path, _file_id(os.fstat(fd))):
            return fd
        os.close(fd)  # we locked a file its holder had just removed: take the new one
    raise BlockingIOError(errno.EAGAIN, "the lock file keeps changing")


@contextlib.contextmanager
def hold_workdir(
    workdir: str | Path, command: str = "train", enabled: bool = True
) -> Iterator[dict[str, Any]]:
    """Hold ``<workdir>/.lock`` for the ``with`` block; refuse if another process holds it.

    Args:
      workdir: the run directory (created if missing, as training would).
      command: what the holder does, named to a second one.
      enabled: False does nothing (processes other than process 0 of a multi-host run:
        process 0's lock stands for the whole job).

    Yields:
      The holder record written to the lock file (``{}`` when disabled).

    Raises:
      UserError: another live process holds the lock (its pid, host and start are named),
        or the workdir cannot be created or written.
    """
    if not enabled:
        yield {}
        return
    workdir = Path(workdir)
    path = workdir / LOCK_FILE
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path)
    except BlockingIOError:
        raise UserError(_busy_message(workdir, read_holder(workdir))) from None
    except OSError as exc:
        raise UserError(
            f"{workdir}: run directory is not writable ({exc.strerror or exc})"
        ) from None
    locked = _file_id(os.fstat(fd))
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "file": locked,  # which file the lock is on (check_held)
    }
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
        except OSError:
            pass  # a full disk: the lock holds anyway, only the message would lack detail
        yield holder
    finally:
        if _names(path, locked):  # not a replaced directory's new lock
            with contextlib.suppress(OSError):
                os.unlink(path)  # still locked: see the module docstring
        os.close(fd)  # releases the lock


def check_held(workdir: str | Path, holder: dict[str, Any]) -> None:
    """Raise when ``<workdir>/.lock`` is no longer the file ``holder`` locked.

    Args:
      workdir: the run directory :func:`hold_workdir` locked.
      holder: what it yielded (``{}``, a disabled lock, checks nothing).

    Raises:
      UserError: the run directory was deleted, moved or replaced since the lock was taken
        (another run may be writing there now); nothing more of this run should be written.
    """
    if holder and not _names(Path(workdir) / LOCK_FILE, holder["file"]):
        raise UserError(
            f"{workdir}: the run directory was deleted or replaced while this run was "
            f"training (its {LOCK_FILE} is not the one pid {holder['pid']} locked); stopped "
            "without writing to it: rerun in a new --workdir (or the same one, to resume "
            "whatever checkpoints are in it now)"
        )


def _file_id(stat: os.stat_result) -> list[int]:
    """A file's identity, ``[device, inode]`` (a list: the holder record is JSON)."""
    return [stat.st_dev, stat.st_ino]


def _names(path: Path, file_id: list[int]) -> bool:
    """Whether ``path`` still names the file ``file_id`` identifies."""
    try:
        return _file_id(os.stat(path)) == file_id
    except OSError:
        return False
